"""`compare`: one ITDA dictionary per group (site, denoising step, or store) on the same inputs,
then Jaccard of their atoms, linear CKA and SVCCA of their activations, as matrices.

Groups share inputs through a key: (sample, step, token) across sites of one harvest or across
stores harvested with the same prompts and seeds; (sample, token) across denoising steps (the
same image token at another point of the trajectory). The keys present in every group are
shuffled once (seed) and every group's dictionary is built from the first ``tokens`` of them in
that same order, so two identical groups give identical dictionaries (Jaccard 1). CKA and SVCCA
use the next ``metric_rows`` keys (rows no dictionary was built from), where each group's ITDA
is also scored (held-out FVU).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from difflens.compare.similarity import jaccard, linear_cka, svcca
from difflens.errors import DifflensError
from difflens.evaluate.metrics import fvu as fvu_of

AXES = ("sites", "steps", "stores")
KEY_FIELDS = {"sites": ("sample_id", "step", "token"), "steps": ("sample_id", "token"), "stores": ("sample_id", "step", "token")}


@dataclass
class CompareConfig:
    """What is compared and how each dictionary is built; recorded in compare.json."""

    axis: str
    sites: list[str]  # sites: the groups; steps/stores: one site
    steps: list[int] | None = None  # steps: the groups (None = every recorded step); else a row filter
    k: int = 16
    tau: float = 0.3
    tokens: int = 32768  # rows each dictionary is built from
    batch_size: int = 1024
    metric_rows: int = 4096  # held-out paired rows for CKA, SVCCA and ITDA's FVU
    seed: int = 0

    def validate(self, n_stores: int) -> None:
        if self.axis not in AXES:
            raise DifflensError(f"compare: axis must be one of {', '.join(AXES)} (got {self.axis!r})")
        for name in ("k", "tokens", "batch_size", "metric_rows"):
            if int(getattr(self, name)) <= 0:
                raise DifflensError(f"compare: --{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if not self.tau > 0:
            raise DifflensError(f"compare: --tau must be positive (got {self.tau})")
        if self.axis == "sites" and len(self.sites) < 2:
            raise DifflensError("compare: across sites needs at least two sites (--sites a,b)")
        if self.axis != "sites" and len(self.sites) != 1:
            raise DifflensError(f"compare: across {self.axis} takes exactly one site (--sites), got {len(self.sites)}")
        if self.axis == "stores" and n_stores < 2:
            raise DifflensError("compare: across stores needs at least two --data stores")
        if self.axis != "stores" and n_stores != 1:
            raise DifflensError(f"compare: across {self.axis} reads one store; pass one --data (or use --across stores)")


@dataclass
class Group:
    label: str
    store: object
    site: str
    step: int | None  # steps axis: the step; else None (all selected steps)


def _groups(stores: list, cfg: CompareConfig) -> list[Group]:
    for s in stores:
        for site in cfg.sites:
            if site not in s.sites:
                raise DifflensError(f"site {site!r} is not in the store {s.root}; its sites are {', '.join(s.sites)}")
    if cfg.axis == "sites":
        return [Group(site, stores[0], site, None) for site in cfg.sites]
    if cfg.axis == "stores":
        names = [Path(s.root).name for s in stores]
        if len(set(names)) < len(names):
            names = [str(s.root) for s in stores]
        return [Group(n, s, cfg.sites[0], None) for n, s in zip(names, stores)]
    recorded = sorted(np.unique(stores[0].meta(cfg.sites[0], ["step"])["step"]).tolist())
    steps = recorded if cfg.steps is None else cfg.steps
    missing = sorted(set(steps) - set(recorded))
    if missing:
        raise DifflensError(f"steps {missing} are not recorded in {stores[0].root} (recorded: {recorded})")
    if len(steps) < 2:
        raise DifflensError(f"compare: across steps needs at least two recorded steps (got {steps})")
    return [Group(f"step {s}", stores[0], cfg.sites[0], int(s)) for s in steps]


def _key_table(g: Group, cfg: CompareConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(keys [n] int64, store row indices [n], provenance columns) of a group's selectable rows."""
    meta = g.store.meta(g.site, ["sample_id", "step", "token"])
    rows = np.arange(len(meta["step"]))
    keep = np.ones(len(rows), dtype=bool)
    if g.step is not None:
        keep &= meta["step"] == g.step
    elif cfg.steps is not None:
        keep &= np.isin(meta["step"], cfg.steps)
    cols = {c: np.asarray(meta[c], dtype=np.int64)[keep] for c in ("sample_id", "step", "token")}
    key = np.zeros(int(keep.sum()), dtype=np.int64)
    for c in KEY_FIELDS[cfg.axis]:  # mixed radix: fields are small non-negative integers
        key = key * (1 << 20) + cols[c]
    if len(np.unique(key)) != len(key):
        raise DifflensError(f"{g.store.root} {g.site}: rows repeat the same {'/'.join(KEY_FIELDS[cfg.axis])}; "
                            "cannot pair them across groups")
    return key, rows[keep], cols


def _build_itda(x_ND: torch.Tensor, prov: dict, cfg: CompareConfig, site: str):
    from difflens.dictionaries import DictConfig, build

    itda = build(DictConfig(arch="itda", d_in=int(x_ND.shape[1]), k=cfg.k, site=site, itda_tau=cfg.tau))
    itda.init_from_data(x_ND[: min(len(x_ND), 16384)])
    for s in range(0, len(x_ND), cfg.batch_size):
        itda.partial_fit(x_ND[s : s + cfg.batch_size], None, {k: v[s : s + cfg.batch_size] for k, v in prov.items()})
    return itda


def compare(stores: list, cfg: CompareConfig, *, progress: bool = True) -> dict:
    """Build the dictionaries and the three similarity matrices (see module docstring)."""
    from difflens.store import Store

    stores = [s if hasattr(s, "meta") else Store(s) for s in stores]
    cfg.validate(len(stores))
    groups = _groups(stores, cfg)
    tables = [_key_table(g, cfg) for g in groups]
    common = tables[0][0]
    for key, _, _ in tables[1:]:
        common = np.intersect1d(common, key)
    need = 2 + cfg.metric_rows // 8
    if len(common) < need:
        raise DifflensError(f"only {len(common)} inputs are present in every group; harvest the same prompts and seeds "
                            "for every store / site (at least a few hundred shared rows are needed)")
    order = np.random.default_rng(cfg.seed).permutation(common)
    n_build = min(cfg.tokens, max(1, len(order) - need))
    build_keys, metric_keys = order[:n_build], order[n_build : n_build + cfg.metric_rows]
    fields = KEY_FIELDS[cfg.axis]
    dicts, atom_ids, acts, info = [], [], [], []
    for g, (key, rows, cols) in zip(groups, tables):
        t0 = time.process_time()
        srt = np.argsort(key)
        pos_b = srt[np.searchsorted(key, build_keys, sorter=srt)]
        pos_m = srt[np.searchsorted(key, metric_keys, sorter=srt)]
        x = g.store.read_rows(g.site, rows[pos_b])
        prov = {c: torch.as_tensor(cols[c][pos_b]) for c in ("sample_id", "step", "token")}
        itda = _build_itda(x, prov, cfg, g.site)
        build_s = time.process_time() - t0
        xm = g.store.read_rows(g.site, rows[pos_m])
        with torch.no_grad():
            xh = itda(xm).x_hat
        fvu = fvu_of(xm, xh)  # the one FVU definition (evaluate/metrics.py)
        p = itda.provenance
        atom_ids.append(np.stack([p[c].numpy() for c in fields], 1))
        acts.append(xm.numpy())
        dicts.append(itda)
        info.append({"label": g.label, "store": str(g.store.root), "site": g.site, "step": g.step, "atoms": itda.num_atoms,
                     "heldout_fvu": fvu, "build_cpu_seconds": round(build_s, 3)})
        if progress:
            print(f"compare: {g.label}: {itda.num_atoms} atoms from {len(x):,} rows, held-out FVU {fvu:.3f}")
    n = len(groups)
    mats = {m: np.eye(n) for m in ("jaccard", "cka", "svcca")}
    for i in range(n):
        for j in range(i + 1, n):
            vals = {"jaccard": jaccard(atom_ids[i], atom_ids[j]), "cka": linear_cka(acts[i], acts[j]),
                    "svcca": svcca(acts[i], acts[j])}
            for m, v in vals.items():
                mats[m][i, j] = mats[m][j, i] = v
    return {
        "compare": cfg.axis,
        "config": asdict(cfg),
        "atom_id_fields": list(fields),
        "labels": [g.label for g in groups],
        "groups": info,
        "build_rows": int(len(build_keys)),
        "metric_rows": int(len(metric_keys)),
        "jaccard": mats["jaccard"].round(6).tolist(),
        "cka": mats["cka"].round(6).tolist(),
        "svcca": mats["svcca"].round(6).tolist(),
    }


def markdown(result: dict) -> str:
    labels = result["labels"]
    lines = [f"# ITDA comparison across {result['compare']}", "",
             f"Each dictionary: k {result['config']['k']}, τ {result['config']['tau']:g}, built from {result['build_rows']:,} "
             f"shared inputs; atoms identified by ({', '.join(result['atom_id_fields'])}). CKA and SVCCA on "
             f"{result['metric_rows']:,} other shared inputs.", "",
             "| group | atoms | held-out FVU | build CPU s |", "|---|---:|---:|---:|"]
    for g in result["groups"]:
        lines.append(f"| {g['label']} | {g['atoms']:,} | {g['heldout_fvu']:.3f} | {g['build_cpu_seconds']:.1f} |")
    for m, title in (("jaccard", "Jaccard of ITDA atoms"), ("cka", "linear CKA"), ("svcca", "SVCCA")):
        lines += ["", f"{title}:", "", "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for lab, row in zip(labels, result[m]):
            lines.append(f"| {lab} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def _short(label: str) -> str:
    """Tick labels: Flux-style block names shortened (single_transformer_blocks.3:img -> single.3:img)."""
    return label.replace("single_transformer_blocks.", "single.").replace("transformer_blocks.", "double.")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflens.utils import atomic_write_bytes

    labels = [_short(v) for v in result["labels"]]
    n = len(labels)
    size = 1.2 + 0.45 * n
    fig, axes = plt.subplots(1, 3, figsize=(3 * size + 1, size + 0.6))
    for ax, (m, title) in zip(axes, (("jaccard", "Jaccard (ITDA atoms)"), ("cka", "linear CKA"), ("svcca", "SVCCA"))):
        a = np.asarray(result[m])
        ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize="x-small")
        ax.set_yticks(range(n), labels, fontsize="x-small")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize="x-small",
                        color="white" if a[i, j] < 0.6 else "black")
        ax.set_title(title, fontsize="small")
    fig.suptitle(f"across {result['compare']}", fontsize="small")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
