"""`difflens browse export`: a self-contained static site over dictionaries and their interpretation.

Layout of the site folder:

    index.html                   every feature of every dictionary (search, sort, filter)
    compare.html                 dictionaries side by side: metric tables and plots
    playground.html              only in a site written by `browse serve` (needs the server)
    features/<dict>/<id>.html    one page per feature (its data embedded as JSON)
    features/<dict>/grid_<id>.png  the interpretation's heatmap grid, when it made one
    img/<sample>.png             the images the pages show (copied from the store)
    plots/*.png                  plots of the interpretation and evaluation
    app.js, pages.js, style.css  the scripts and style sheet (playground.js too with the playground);
                                 no CDN, no remote fonts
    site.json                    what was exported, from where, with which notes

Pages build their DOM with textContent/createElement from JSON embedded in a
`<script type="application/json">` element (no fetch, so it works from file://); the few strings
the Python side puts into HTML go through html.escape. The site is built in a temporary folder
next to the target and renamed into place.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from difflens.browse.assets import PAGE_SCRIPTS, static_files
from difflens.browse.data import DictEntry, Inputs, resolve_inputs
from difflens.errors import DifflensError
from difflens.outdir import os_error_message
from difflens.store.fsio import inside
from difflens.utils import progress

SITE_MARKER = "site.json"
SITE_FORMAT = "difflens-browse-site"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'")


# ---- small helpers -------------------------------------------------------------------------------------
def json_for_script(obj) -> str:
    """JSON safe inside a <script type="application/json"> element: no '<', '>' or '&' survive, so
    no string can close the element or open a comment, whatever it contains."""
    s = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace(
        "\u2028", "\\u2028").replace("\u2029", "\\u2029")


def page_html(title: str, page: str, data, root: str = "", nav: list[tuple[str, str]] | None = None) -> str:
    """A page shell: escaped title, the embedded data, the page's scripts (assets.PAGE_SCRIPTS). Everything
    else is built by the scripts."""
    if page not in PAGE_SCRIPTS:
        raise ValueError(f"page_html: unknown page kind {page!r}; one of {', '.join(PAGE_SCRIPTS)}")
    links = "".join(f'<a href="{html.escape(root + href, quote=True)}">{html.escape(label)}</a>'
                    for href, label in (nav or []))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{html.escape(CSP, quote=True)}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n<link rel=\"icon\" href=\"data:,\">\n"
        f"<title>{html.escape(title)}</title>\n"
        f"<link rel=\"stylesheet\" href=\"{html.escape(root, quote=True)}style.css\">\n</head>\n"
        f"<body data-page=\"{html.escape(page, quote=True)}\">\n"
        f"<nav class=\"top\">{links}</nav>\n<main id=\"app\"><h1>{html.escape(title)}</h1>"
        "<noscript>This page needs JavaScript (its scripts are files of this site; nothing is loaded from the network).</noscript></main>\n"
        f"<script type=\"application/json\" id=\"difflens-data\">{json_for_script(data)}</script>\n"
        + "".join(f"<script src=\"{html.escape(root + name, quote=True)}\"></script>\n" for name in PAGE_SCRIPTS[page])
        + "</body>\n</html>\n"
    )


def _num(x, nd: int = 6):
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return round(v, nd)


def _clean(obj):
    """JSON-able copy with non-finite floats as null (the page JSON must be strict)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        return _clean(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def encode_map(values) -> dict | None:
    """A token map as {m: its max, b: base64 of uint8 round(255 * v / m), negatives clipped to 0}."""
    if values is None:
        return None
    a = np.asarray(values, np.float32).reshape(-1)
    a = np.where(np.isfinite(a), a, 0.0)
    m = float(a.max()) if a.size else 0.0
    q = np.zeros(a.shape, np.uint8) if m <= 0 else np.clip(np.rint(np.maximum(a, 0) / m * 255), 0, 255).astype(np.uint8)
    return {"m": round(m, 5), "b": base64.b64encode(q.tobytes()).decode("ascii")}


# ---- neighbours by decoder cosine ------------------------------------------------------------------------
def decoder_directions(entry: DictEntry):
    """Unit decoder directions [F, D] (float32 CPU), or None when the weights cannot be read."""
    import difflens

    try:
        d = difflens.load(entry.path)
        W = d.decoder_directions().detach().float().cpu()
    except DifflensError:
        raise
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return W


def nearest(W_q, W_all, k: int, exclude_self: bool, chunk: int = 512):
    """Top-k cosine neighbours of each row of W_q among W_all: (idx [n, k], cos [n, k])."""
    import torch

    n = W_q.shape[0]
    k = min(k, W_all.shape[0] - (1 if exclude_self else 0))
    if k <= 0 or n == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    idx_out, cos_out = [], []
    for a in range(0, n, chunk):
        sims = W_q[a : a + chunk] @ W_all.T
        if exclude_self:
            r = torch.arange(a, min(a + chunk, n))
            sims[r - a, r] = -float("inf")
        v, i = torch.topk(sims, k, dim=1)
        idx_out.append(i.numpy())
        cos_out.append(v.numpy())
    return np.concatenate(idx_out), np.concatenate(cos_out)


# ---- the export ---------------------------------------------------------------------------------------------
class _Samples:
    """Prompts and image files of the store's samples (images copied only when a page shows them)."""

    def __init__(self, store_path: Path | None):
        self.records: dict[int, dict] = {}
        self.store = None
        if store_path is not None:
            from difflens.interpret.sample_folder import open_samples

            self.store = open_samples(store_path)  # a store, or the samples folder of `interpret --generate`
            self.records = {int(r["sample_id"]): r for r in self.store.samples()}
        self.used: set[int] = set()
        self._timesteps: dict[str, dict[int, float]] = {}

    def timestep(self, site: str, step) -> float | None:
        """The timestep a harvest step index ran at (one schedule per store), from the site's rows."""
        if self.store is None or step is None:
            return None
        if site not in self._timesteps:
            try:
                m = self.store.meta(site, ["step", "timestep"])
                self._timesteps[site] = {int(a): float(b) for a, b in zip(*np.unique(np.stack([m["step"], m["timestep"]]), axis=1))}
            except DifflensError:
                self._timesteps[site] = {}
        return self._timesteps[site].get(int(step))

    def prompt(self, sid: int) -> str | None:
        p = self.records.get(int(sid), {}).get("prompt")
        return None if p is None else str(p)

    def has_image(self, sid: int) -> bool:
        if self.store is None:
            return False
        try:
            return self.store.image_path(int(sid)).exists()
        except DifflensError:
            return False

    def use(self, sid) -> dict:
        sid = int(sid)
        ok = self.has_image(sid)
        if ok:
            self.used.add(sid)
        return {"sid": sid, "img": ok, "prompt": self.prompt(sid)}

    def copy_to(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for sid in sorted(self.used):
            shutil.copyfile(self.store.image_path(sid), folder / f"{sid}.png")


def _dict_summary(e: DictEntry) -> dict:
    row = {"name": e.name, "slug": e.slug, "arch": e.arch, "site": e.site, "features": e.num_latents,
           "k": e.cfg.get("k"), "d_in": e.cfg.get("d_in"), "path": str(e.path), "interpreted": e.interp is not None,
           "model": e.cfg.get("model")}
    if e.scores and isinstance(e.scores.get("summary"), dict):
        row["interp"] = _clean(e.scores["summary"])
    if e.evaluation and isinstance(e.evaluation.get("metrics"), dict):
        m = e.evaluation["metrics"]
        row["eval"] = _clean({k: m.get(k) for k in ("fvu", "explained_variance", "mse", "cosine", "l0", "dead_fraction", "n")})
        row["eval_by_timestep"] = _clean([{k: r.get(k) for k in ("step", "timestep", "fvu", "cosine", "l0")}
                                          for r in m.get("by_timestep") or []])
    if e.splice:
        s = e.splice
        row["splice"] = _clean({"mse": (s.get("splice") or {}).get("mse"), "psnr_db": (s.get("splice") or {}).get("psnr_db"),
                                "fidelity_recovered": s.get("fidelity_recovered"),
                                "error_term_check": (s.get("error_term_check") or {}).get("passed")})
    return row


def feature_rows(e: DictEntry, max_features: int | None) -> list[dict]:
    """Index rows: from the interpretation when there is one, else every latent (id only)."""
    if e.index and isinstance(e.index.get("features"), list):
        rows = []
        for r in e.index["features"]:
            rows.append({"f": int(r["feature"]), "freq": _num(r.get("frequency")), "max": _num(r.get("max"), 4),
                         "peak": _num(r.get("peak_timestep"), 2), "expl": None if r.get("explanation") is None else str(r["explanation"]),
                         "score": _num(r.get("score"), 4), "maps": bool(r.get("has_maps"))})
    else:
        rows = [{"f": f, "freq": None, "max": None, "peak": None, "expl": None, "score": None, "maps": False}
                for f in range(e.num_latents)]
    if max_features is not None and len(rows) > max_features:
        # keep the scored features first, then the most frequent
        rows.sort(key=lambda r: (r["score"] is None, -(r["freq"] or 0), r["f"]))
        rows = sorted(rows[:max_features], key=lambda r: r["f"])
    return rows


def _feature_page_data(e: DictEntry, row: dict, detail: dict | None, samples: _Samples, neigh: list[dict],
                       has_grid: bool, prev_next: tuple[int | None, int | None]) -> dict:
    d = {"dict": {"name": e.name, "slug": e.slug, "arch": e.arch, "site": e.site},
         "feature": row["f"], "frequency": row["freq"], "max": row["max"], "peak_timestep": row["peak"],
         "explanation": row["expl"], "score": row["score"], "neighbours": neigh, "grid": f"grid_{row['f']}.png" if has_grid else None,
         "prev": prev_next[0], "next": prev_next[1]}
    if not detail:
        return d
    d.update({
        "concept": detail.get("concept"), "level": detail.get("level"), "localisation": _num(detail.get("localisation"), 4),
        "threshold": _num(detail.get("threshold"), 5), "timesteps": _clean(detail.get("timesteps") or []),
        "profile_mean": _clean(detail.get("profile_mean") or []), "profile_max": _clean(detail.get("profile_max") or []),
        "peak_step": detail.get("peak_step"), "histogram": _clean(detail.get("histogram")),
        "grid_hw": list(detail.get("grid_hw") or [16, 16]),
    })
    ts = d["timesteps"]
    top = []
    for t in detail.get("top") or []:
        top.append({**samples.use(t["sample_id"]), "value": _num(t.get("value"), 4), "step": t.get("step"),
                    "timestep": _num(t.get("timestep"), 2), "split": t.get("split"), "map": encode_map(t.get("map"))})
    d["top"] = top
    if top and detail.get("best_maps_by_step"):
        d["best_by_step"] = {"sid": top[0]["sid"], "img": top[0]["img"], "prompt": top[0]["prompt"],
                             "maps": [{"timestep": ts[i] if i < len(ts) else None, "map": encode_map(m)}
                                      for i, m in enumerate(detail["best_maps_by_step"])]}
    d["quantiles"] = [{**samples.use(q["sample_id"]), "value": _num(q.get("value"), 4), "timestep": _num(q.get("timestep"), 2),
                       "map": encode_map(q.get("map"))} for q in detail.get("quantiles") or []]
    test = detail.get("test")
    if isinstance(test, list):
        d["test"] = [{**samples.use(t["sample_id"]), "positive": bool(t.get("positive")), "from_feature": t.get("from_feature"),
                      "s": _num(t.get("s"), 4)} for t in test]
    prov = detail.get("provenance")
    if isinstance(prov, dict) and int(prov.get("sample_id", -1)) >= 0:
        p = {**samples.use(prov["sample_id"]), "step": prov.get("step"), "token": prov.get("token"),
             "timestep": _num(samples.timestep(e.site, prov.get("step")), 2)}
        d["provenance"] = _clean(p)
    return d


def _plots(inputs: Inputs, folder: Path) -> list[dict]:
    out = []

    def add(src: Path | None, name: str, caption: str):
        if src is not None:
            src = inside(src.parent, src.name, "plot")
        if src is not None and src.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, folder / name)
            out.append({"file": f"plots/{name}", "caption": caption})

    r = inputs.interp_root
    add(r / "score_hist.png" if r else None, "interp_score_hist.png", "autointerp score distributions (all sources)")
    add(r / "hierarchy.png" if r else None, "interp_hierarchy.png", "timestep hierarchy of concept types")
    add(inputs.eval_path.parent / "eval_timestep.png" if inputs.eval_path else None, "eval_timestep.png",
        "reconstruction metrics by timestep")
    for e in inputs.dicts:
        add(e.interp / "score_hist.png" if e.interp else None, f"score_hist_{e.slug}.png", f"{e.name}: autointerp scores")
    return out


def _site_files(folder: Path) -> set[str]:
    """Every file, symlink and folder entry under `folder`, as relative POSIX paths (links not followed)."""
    found: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(top).relative_to(folder)
        for name in files + [d for d in dirs if (Path(top) / d).is_symlink()]:
            found.add((rel / name).as_posix())
    return found


def check_site_target(out: Path) -> None:
    """`out` may be replaced only when it is absent, empty, or an earlier export holding nothing else.

    An earlier export lists every file it wrote in site.json; a folder with any other file (a user's
    thesis next to a stray site.json) is refused, never deleted.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DifflensError(f"--out {out} is a file or a link, not a site folder: pass a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        m = json.loads((out / SITE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        m = None
    if not isinstance(m, dict) or m.get("format") != SITE_FORMAT or not isinstance(m.get("files"), list):
        raise DifflensError(f"--out {out} exists and is not a site exported by difflens: pass a new or empty folder "
                            "(nothing was changed or deleted)")
    extra = sorted(_site_files(out) - set(map(str, m["files"])) - {SITE_MARKER})
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise DifflensError(f"--out {out} is an earlier export but also holds files the export did not write ({shown}): "
                            "move them out or pass another folder (nothing was changed or deleted)")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished site into place; an existing target must be a previous export (never a user folder)."""
    if out.exists():
        check_site_target(out)  # again: the folder may have changed while the site was built
        old = out.parent / f".{out.name}.old-{os.getpid()}-{int(time.time() * 1000)}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_site(dicts, out, *, interp=None, evaluation=None, store=None, neighbours: int = 8,
                max_features: int | None = None, playground: dict | None = None,
                title: str = "difflens feature browser", show_progress: bool = True) -> Path:
    """Write the static site for `dicts` (dictionary folders) to `out`; returns `out`.

    `playground` (used by `browse serve`) adds playground.html with that config embedded. The site
    is written into a temporary sibling folder and swapped in whole, so a failure leaves `out` as it was.
    """
    out = Path(out)
    if max_features is not None and max_features < 1:
        raise DifflensError(f"--max-features must be >= 1, got {max_features}")
    if neighbours < 0:
        raise DifflensError(f"--neighbours must be >= 0, got {neighbours}")
    inputs = resolve_inputs(dicts, interp=interp, evaluation=evaluation, store=store)
    check_site_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DifflensError(os_error_message(e, out.parent, "create")) from None
    samples = _Samples(inputs.store_path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise DifflensError(os_error_message(e, out.parent, "write into")) from None
    try:
        kinds = ["index", "feature", "compare"] + (["playground"] if playground is not None else [])
        for name, text in static_files(kinds).items():  # the scripts those pages load, and the style sheet
            (tmp / name).write_text(text, encoding="utf-8")
        nav = [("index.html", "Features"), ("compare.html", "Compare dictionaries")]
        if playground is not None:
            nav.append(("playground.html", "Playground"))
        rows = {e.slug: feature_rows(e, max_features) for e in inputs.dicts}
        near = _Neighbours(inputs, rows, neighbours)
        grids_count = _write_feature_pages(tmp, inputs, rows, near, samples, nav, show_progress)
        samples.copy_to(tmp / "img")
        _write_summary_pages(tmp, inputs, rows, nav, title, playground)
        _write_site_manifest(tmp, inputs, rows, samples, title, grids_count, playground)
        for p in tmp.rglob("*"):  # mkdtemp made the folder 0700; give the site ordinary permissions
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DifflensError(os_error_message(e, out)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _Neighbours:
    """Each feature's nearest features by decoder cosine: its own dictionary's first, then the best
    matches in the other dictionaries at the same site (with explanations and page links)."""

    def __init__(self, inputs, rows: dict, k: int):
        self.inputs, self.k = inputs, k
        self.expl = {e.slug: {r["f"]: r["expl"] for r in rows[e.slug]} for e in inputs.dicts}
        self.pages = {e.slug: {r["f"] for r in rows[e.slug]} for e in inputs.dicts}
        self.dirs = {}
        for e in inputs.dicts:
            try:
                self.dirs[e.slug] = decoder_directions(e)
            except (DifflensError, OSError, RuntimeError, ValueError) as err:
                inputs.notes.append(f"{e.name}: decoder weights unreadable ({err}); no nearest features")

    def of(self, e: DictEntry, feats: list[int]) -> dict[int, list[dict]]:
        import torch

        res: dict[int, list[dict]] = {f: [] for f in feats}
        if e.slug not in self.dirs or not feats or self.k == 0:
            return res
        W = self.dirs[e.slug]
        q = W[torch.as_tensor(feats)]
        for other in self.inputs.dicts:
            if other.slug not in self.dirs or self.dirs[other.slug].shape[1] != W.shape[1] or other.site != e.site:
                continue
            same = other.slug == e.slug
            if same:
                idx, cos = nearest(q, W, self.k + 1, exclude_self=False)
            else:
                idx, cos = nearest(q, self.dirs[other.slug], max(1, self.k // 4), exclude_self=False)
            for qi, f in enumerate(feats):
                for j, c in zip(idx[qi].tolist(), cos[qi].tolist()):
                    if same and j == f:
                        continue
                    res[f].append({"dict": other.name, "slug": other.slug, "feature": int(j), "cos": round(float(c), 4),
                                   "explanation": self.expl[other.slug].get(int(j)), "page": int(j) in self.pages[other.slug]})
                if same:
                    res[f] = [n for n in res[f] if not (n["slug"] == e.slug and n["feature"] == f)]
        for f in feats:  # same dictionary first, then the best match elsewhere
            res[f].sort(key=lambda n: (n["slug"] != e.slug, -n["cos"]))
            own = [n for n in res[f] if n["slug"] == e.slug][: self.k]
            res[f] = own + [n for n in res[f] if n["slug"] != e.slug]
        return res


def _write_feature_pages(tmp: Path, inputs, rows: dict, near: _Neighbours, samples, nav, show_progress: bool) -> int:
    """features/<slug>/<f>.html (and the interpretation's heatmap grid beside it) for every listed
    feature; marks each row as having a page. Returns the number of grids copied."""
    bar = progress(total=sum(len(v) for v in rows.values()), desc="browse export", unit="feature",
                   **({} if show_progress else {"disable": True}))
    grids_count = 0
    for e in inputs.dicts:
        folder = tmp / "features" / e.slug
        folder.mkdir(parents=True, exist_ok=True)
        feats = [r["f"] for r in rows[e.slug]]
        neigh = near.of(e, feats)
        for i, r in enumerate(rows[e.slug]):
            f = r["f"]
            detail = e.feature_json(f) if (r["maps"] and e.interp is not None) else None
            grid_src = inside(e.interp, f"heatmaps/feature_{f}.png", "heatmap grid") if e.interp else None
            has_grid = bool(grid_src and grid_src.is_file())
            if has_grid:
                shutil.copyfile(grid_src, folder / f"grid_{f}.png")
                grids_count += 1
            pn = (feats[i - 1] if i > 0 else None, feats[i + 1] if i + 1 < len(feats) else None)
            data = _feature_page_data(e, r, detail, samples, neigh.get(f, []), has_grid, pn)
            r["page"] = True
            r["n_top"] = len(data.get("top") or [])
            page = page_html(f"{e.name} feature {f}", "feature", data, root="../../", nav=nav)
            (folder / f"{f}.html").write_text(page, encoding="utf-8")
            bar.update(1)
    bar.close()
    return grids_count


def _write_summary_pages(tmp: Path, inputs, rows: dict, nav, title: str, playground: dict | None) -> None:
    """index.html (every feature row), compare.html (dictionaries side by side, plots, the
    interpretation's table and checks) and, when served, playground.html."""
    plots = _plots(inputs, tmp / "plots")
    dict_rows = [_dict_summary(e) for e in inputs.dicts]
    index_data = {"title": title, "dicts": dict_rows, "notes": inputs.notes,
                  "rows": {e.slug: rows[e.slug] for e in inputs.dicts},
                  "timesteps": next((_clean(e.index.get("timesteps")) for e in inputs.dicts if e.index), None)}
    (tmp / "index.html").write_text(page_html(title, "index", index_data, nav=nav), encoding="utf-8")
    comp = inputs.comparison or {}
    compare_data = {"title": "Compare dictionaries", "dicts": dict_rows, "plots": plots,
                    "interp": {"site": comp.get("site"), "judge": comp.get("judge"), "rows": _clean(comp.get("rows") or []),
                               "checks": _clean(comp.get("checks") or {})} if comp else None,
                    "run": _clean({k: (inputs.run or {}).get(k) for k in ("site", "judge", "explainer", "num_samples", "n_features", "protocol")})
                    if inputs.run else None,
                    "splice_definitions": ((inputs.eval_report or {}).get("splice") or {}).get("definitions"),
                    "notes": inputs.notes}
    (tmp / "compare.html").write_text(page_html("Compare dictionaries", "compare", compare_data, nav=nav), encoding="utf-8")
    if playground is not None:
        pg = {**playground, "dicts": [d for d in dict_rows if d["slug"] in set(playground.get("slugs", []))]}
        (tmp / "playground.html").write_text(page_html("Playground", "playground", pg, nav=nav), encoding="utf-8")


def _write_site_manifest(tmp: Path, inputs, rows: dict, samples, title: str, grids_count: int,
                         playground: dict | None) -> None:
    """site.json: what the site was made from and every file it holds (the next export's check)."""
    manifest = {"format": SITE_FORMAT, "created": time.time(), "title": title,
                "dictionaries": [{"name": e.name, "slug": e.slug, "path": str(e.path), "interp": str(e.interp) if e.interp else None,
                                  "features": len(rows[e.slug])} for e in inputs.dicts],
                "interp": str(inputs.interp_root) if inputs.interp_root else None,
                "eval": str(inputs.eval_path) if inputs.eval_path else None,
                "store": str(inputs.store_path) if inputs.store_path else None,
                "images": len(samples.used), "heatmap_grids": grids_count, "notes": inputs.notes,
                "playground": playground is not None}
    manifest["files"] = sorted(_site_files(tmp) | {SITE_MARKER})
    (tmp / SITE_MARKER).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_site_manifest(site: Path) -> dict:
    m = site / SITE_MARKER
    if not m.is_file():
        raise DifflensError(f"{site} is not a site exported by difflens (no {SITE_MARKER}): run `difflens browse export`")
    return json.loads(m.read_text(encoding="utf-8"))


__all__ = ["export_site", "json_for_script", "page_html", "encode_map", "read_site_manifest"]
