"""Find what the browser shows for each dictionary: its interpretation, its evaluation, the store.

Rules (also in docs/browse.md):

* interpretation: `--interp DIR` is a `difflens interpret --out` folder (it holds run.json). Without
  it, `<dict>/../../interpret` and `<dict>/../interpret` are tried (the `difflens demo` layout:
  `<out>/dicts/<name>` next to `<out>/interpret`). Inside it a dictionary's features are in
  `<interp>/<name>/features/`, `<name>` being the dictionary folder's name (what `difflens
  interpret --dict DIR` calls it); the folder is only used when its site and feature count match
  the dictionary's.
* evaluation: `--eval FILE` (an eval.json of `difflens evaluate`); without it
  `<interp>/../evaluate/eval.json` and `<dict>/../../evaluate/eval.json`. Rows are matched by the
  dictionary's path, then by name.
* images and prompts: `--data DIR`; without it the store the interpretation was built from
  (run.json `data.path`, tried as written, relative to the interpretation's parent folders, and
  `<interp>/../store`), accepted only when its fingerprint matches.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from difflens.errors import DifflensError


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DifflensError(f"{path} is not readable JSON ({e}): re-run the step that wrote it") from None


def _in(root: Path, rel: str) -> Path:
    """A file of an interpretation folder, refused when a link (or `..`) leads out of it."""
    from difflens.store.fsio import inside

    return inside(root, rel, "interpretation file")


def slug(name: str) -> str:
    """A file-name-safe form of a dictionary name (names come from folder names users chose)."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)).strip(".") or "dict"
    return s[:64]


@dataclass
class DictEntry:
    """One dictionary to browse and everything found about it."""

    name: str
    slug: str
    path: Path
    cfg: dict
    interp: Path | None = None  # <interp>/<name>: features/, heatmaps/, scores.json, score_hist.png
    index: dict | None = None  # <interp>/<name>/features/index.json
    scores: dict | None = None  # <interp>/<name>/scores.json
    evaluation: dict | None = None  # this dictionary's row of eval.json
    splice: dict | None = None  # its row of eval.json's splice section

    @property
    def site(self) -> str:
        return str(self.cfg.get("site") or "")

    @property
    def arch(self) -> str:
        return str(self.cfg.get("architecture") or self.cfg.get("arch") or "?")

    @property
    def num_latents(self) -> int:
        return int(self.cfg.get("num_latents") or self.cfg.get("width") or 0)

    def feature_json(self, f: int) -> dict | None:
        if self.interp is None:
            return None
        return _read_json(_in(self.interp, f"features/{int(f)}.json"))


@dataclass
class Inputs:
    dicts: list[DictEntry]
    interp_root: Path | None = None
    run: dict | None = None  # interp run.json
    comparison: dict | None = None  # interp comparison.json
    eval_path: Path | None = None
    eval_report: dict | None = None
    store_path: Path | None = None
    notes: list[str] = field(default_factory=list)


def read_dict_cfg(path) -> dict:
    """The cfg.json of a dictionary folder or ``hf:ORG/REPO[/SUB][@REV]`` reference."""
    from difflens.dictionaries.hub import local_folder

    path = local_folder(path)
    cfg_path = path / "cfg.json"
    if not path.is_dir():
        raise DifflensError(f"--dict {path}: no such folder; pass a dictionary folder (cfg.json + weights.safetensors)")
    cfg = _read_json(cfg_path)
    if cfg is None:
        raise DifflensError(f"--dict {path}: no cfg.json inside; pass a dictionary folder written by `difflens train`")
    if not isinstance(cfg, dict):
        raise DifflensError(f"{cfg_path} is not a dictionary config (a JSON object expected)")
    return cfg


def _interp_candidates(dict_path: Path) -> list[Path]:
    return [dict_path.parent.parent / "interpret", dict_path.parent / "interpret"]


def _match_source(root: Path, entry: DictEntry) -> Path | None:
    """The <root>/<name> folder holding this dictionary's features, when site and size agree."""
    names = [entry.name, entry.arch]
    for n in names:
        if not n or "/" in n or n in (".", ".."):
            continue
        folder = root / n
        idx = _read_json(_in(root, f"{n}/features/index.json"))
        if not isinstance(idx, dict):
            continue
        src = idx.get("source") or {}
        same_site = not entry.site or src.get("site") in (None, entry.site)
        same_size = not entry.num_latents or int(src.get("num_features") or entry.num_latents) == entry.num_latents
        if same_site and same_size:
            return folder
    return None


def find_store(run: dict | None, interp_root: Path | None, given: str | Path | None, notes: list[str]) -> Path | None:
    from difflens.store import Store

    from difflens.interpret.sample_folder import is_sample_folder

    if given is not None:
        p = Path(given)
        if not (p / "manifest.json").exists() and not is_sample_folder(p):
            raise DifflensError(f"--data {p}: not an activation store (no manifest.json) nor the samples folder of "
                                "`interpret --generate` (no samples.json); pass the one the interpretation was built from")
        return p
    data = (run or {}).get("data") or {}
    if data.get("kind") == "generated" and interp_root is not None and is_sample_folder(interp_root / "samples"):
        return interp_root / "samples"  # the images `interpret --generate` saved with its run
    if data.get("kind") != "store":
        if run is not None:
            notes.append(f"the interpretation used {data.get('kind', 'unknown')} samples, not a store: top images are "
                         "shown from the interpretation's heatmap grids only (pass --data for prompts)")
        return None
    want = data.get("fingerprint")
    cands = []
    if data.get("path"):
        raw = Path(data["path"])
        cands.append(raw)
        if not raw.is_absolute() and interp_root is not None:
            for parent in list(interp_root.resolve().parents)[:4]:
                cands.append(parent / raw)
    if interp_root is not None:
        cands.append(interp_root.parent / "store")
    for c in cands:
        if (c / "manifest.json").exists():
            try:
                if want and Store(c).fingerprint() != want:
                    continue
            except Exception:  # an unreadable store is just not the one we want
                continue
            return c
    notes.append(f"the store of the interpretation ({data.get('path')}) was not found: pass --data DIR to show "
                 "images and prompts")
    return None


def resolve_inputs(dicts, *, interp=None, evaluation=None, store=None) -> Inputs:
    """Read the dictionaries' configs and find their interpretation, evaluation and store."""
    from difflens.dictionaries.hub import display_name, local_folder

    paths = [local_folder(d) for d in (dicts or [])]
    if not paths:
        raise DifflensError("no dictionaries: pass --dict DIR (one or more)")
    entries: list[DictEntry] = []
    used: set[str] = set()
    for p in paths:
        cfg = read_dict_cfg(p)
        base = display_name(p) or p.resolve().name or "dict"
        name, i = base, 2
        while name in {e.name for e in entries}:
            name, i = f"{base}-{i}", i + 1
        s, j = slug(name), 2
        while s in used:
            s, j = f"{slug(name)}-{j}", j + 1
        used.add(s)
        entries.append(DictEntry(name=name, slug=s, path=p, cfg=cfg))
    notes: list[str] = []

    # interpretation
    interp_root: Path | None = None
    if interp is not None:
        interp_root = Path(interp)
        if not (interp_root / "run.json").exists() and not any((interp_root / e.name / "features").is_dir() for e in entries):
            raise DifflensError(f"--interp {interp_root}: no interpretation there (run.json); pass the folder given "
                                "to `difflens interpret --out`")
    else:
        for e in entries:
            for c in _interp_candidates(e.path):
                if (c / "run.json").exists():
                    interp_root = c
                    break
            if interp_root:
                break
    run = _read_json(_in(interp_root, "run.json")) if interp_root else None
    comparison = _read_json(_in(interp_root, "comparison.json")) if interp_root else None
    for e in entries:
        if interp_root is None:
            continue
        folder = _match_source(interp_root, e)
        if folder is None:
            notes.append(f"{e.name}: no matching interpretation in {interp_root} (looked for {e.name}/features with "
                         f"site {e.site} and {e.num_latents} features)")
            continue
        e.interp = folder
        e.index = _read_json(_in(folder, "features/index.json"))
        e.scores = _read_json(_in(folder, "scores.json"))
    if interp_root is None:
        notes.append("no interpretation found (pass --interp DIR, the `difflens interpret --out` folder): features "
                     "have no explanations, scores or top images")

    # evaluation
    eval_path: Path | None = None
    if evaluation is not None:
        eval_path = Path(evaluation)
        if eval_path.is_dir():
            eval_path = eval_path / "eval.json"
        if not eval_path.exists():
            raise DifflensError(f"--eval {evaluation}: no eval.json there; pass the file `difflens evaluate --out` wrote")
    else:
        cands = ([interp_root.parent / "evaluate" / "eval.json"] if interp_root else []) + [
            e.path.parent.parent / "evaluate" / "eval.json" for e in entries]
        eval_path = next((c for c in cands if c.exists()), None)
    eval_report = _read_json(eval_path) if eval_path else None
    if eval_report is not None:
        rows = eval_report.get("dictionaries") or []
        splice = ((eval_report.get("splice") or {}).get("dictionaries")) or []
        for e in entries:
            real = str(e.path.resolve())
            row = next((r for r in rows if r.get("path") and str(Path(r["path"]).resolve()) == real), None)
            row = row or next((r for r in rows if r.get("name") == e.name), None)
            e.evaluation = row
            e.splice = next((r for r in splice if r.get("name") == (row or {}).get("name", e.name)), None)

    store_path = find_store(run, interp_root, store, notes)
    return Inputs(entries, interp_root, run, comparison, eval_path, eval_report, store_path, notes)
