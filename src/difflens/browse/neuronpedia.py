"""Feature export for dashboards that host features (Neuronpedia-style): one JSON file per feature.

Reads a `difflens interpret --out` folder (its per-feature JSON and index) and, when found, the
store it was built from (prompts, seeds, images); writes

    OUT/<source>/<feature>.json   one feature (schema `difflens.feature/1`, docs/feature-export.md)
    OUT/<source>/index.json       the source's features in one list (id, frequency, max, explanation, score)
    OUT/img/<sample_id>.png       the images the top activations point at (with a store)

Field names follow the ones Neuronpedia's feature pages use where the meaning is the same
(`index`, `layer`, `explanations[].description`, `frac_nonzero`, `maxActApprox`,
`activations[].values/maxValue/maxValueTokenIndex`); what is specific to diffusion models
(timesteps, token grids, images) has its own fields.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from difflens.errors import DifflensError
from difflens.store.fsio import inside
from difflens.utils import read_json, write_json

SCHEMA = "difflens.feature/1"
KIND = "browse neuronpedia"


def _sources(interp: Path, only: list[str] | None) -> list[str]:
    found = sorted(p.parent.parent.name for p in interp.glob("*/features/index.json"))
    if not found:
        raise DifflensError(f"--interp {interp}: no <source>/features/index.json inside; pass the folder "
                            "`difflens interpret --out` wrote")
    if only:
        missing = [s for s in only if s not in found]
        if missing:
            raise DifflensError(f"--source {', '.join(missing)}: not in {interp} (it holds {', '.join(found)})")
        return list(only)
    return found


def _activation(e: dict, grid_hw, samples: dict, with_image: bool) -> dict:
    values = [float(v) for v in e.get("map") or []]
    top = max(range(len(values)), key=values.__getitem__) if values else None
    s = samples.get(int(e["sample_id"]), {})
    return {
        "sample_id": int(e["sample_id"]),
        "prompt": s.get("prompt"),
        "seed": s.get("seed"),
        "image": f"../img/{int(e['sample_id'])}.png" if with_image else None,
        "timestep": e.get("timestep"),
        "split": e.get("split"),
        "grid_hw": list(grid_hw) if grid_hw else None,
        "values": values,  # one per image token, row-major over grid_hw
        "maxValue": e.get("value"),
        "maxValueTokenIndex": top,
    }


def feature_record(detail: dict, *, source: str, site: str, model: str | None, judge: str | None,
                   explainer: str | None, samples: dict, images: set[int]) -> dict:
    """One feature in the export schema, from the interpretation's per-feature JSON."""
    grid = detail.get("grid_hw")
    expl = detail.get("explanation")
    return {
        "schema": SCHEMA,
        "modelId": model,
        "layer": site,
        "source": source,
        "index": int(detail["feature"]),
        "explanations": [] if expl is None else [
            {"description": expl, "score": detail.get("score"), "explainer": explainer, "judge": judge}],
        "frac_nonzero": detail.get("frequency"),
        "maxActApprox": detail.get("max"),
        "threshold": detail.get("threshold"),
        "peak_timestep": detail.get("peak_timestep"),
        "timesteps": detail.get("timesteps") or [],
        "profile_mean": detail.get("profile_mean") or [],
        "profile_image_max": detail.get("profile_max") or [],
        "histogram": detail.get("histogram"),
        "concept": detail.get("concept"),
        "localisation_iou": detail.get("localisation"),
        "activations": [_activation(e, grid, samples, int(e["sample_id"]) in images) for e in detail.get("top") or []],
        "quantile_activations": [_activation(e, grid, samples, int(e["sample_id"]) in images)
                                 for e in detail.get("quantiles") or []],
    }


def export_neuronpedia(interp, out, *, sources: list[str] | None = None, data=None, copy_images: bool = True) -> dict:
    """Write the per-feature JSON of every (or the chosen) source of an interpretation; returns a summary."""
    from difflens.browse.data import find_store
    from difflens.interpret.sample_folder import open_samples
    from difflens.outdir import claim_out_dir

    interp = Path(interp)
    if not (interp / "run.json").exists():
        raise DifflensError(f"--interp {interp}: no run.json; pass the folder `difflens interpret --out` wrote")
    run = read_json(interp / "run.json")
    names = _sources(interp, sources)
    notes: list[str] = []
    store_path = find_store(run, interp, data, notes)
    store = open_samples(store_path) if store_path is not None else None
    samples = {int(s["sample_id"]): s for s in store.samples()} if store is not None else {}
    model = (store.manifest.get("model") if store is not None else None) or run.get("model")
    out = claim_out_dir(out, KIND, {"interp": str(interp.resolve())})
    summary = {"schema": SCHEMA, "interp": str(interp), "store": str(store_path) if store_path else None,
               "sources": {}, "notes": notes}
    wanted_images: set[int] = set()
    for name in names:
        folder = interp / name / "features"
        index = read_json(folder / "index.json")
        site = index.get("site") or run.get("site")
        details = {}
        for row in index.get("features", []):
            p = folder / f"{int(row['feature'])}.json"
            details[int(row["feature"])] = read_json(p) if p.exists() else row
        for d in details.values():
            wanted_images.update(int(e["sample_id"]) for e in (d.get("top") or []) + (d.get("quantiles") or []))
        have = set()
        if store is not None and copy_images:
            (out / "img").mkdir(exist_ok=True)
            for sid in sorted(wanted_images):
                try:
                    src = store.image_path(sid)
                except DifflensError:
                    continue
                dst = out / "img" / f"{sid}.png"
                if not dst.exists():
                    shutil.copyfile(src, dst)
                have.add(sid)
        dest = out / name
        dest.mkdir(exist_ok=True)
        rows = []
        for f, d in sorted(details.items()):
            rec = feature_record(d, source=name, site=site, model=model, judge=run.get("judge"),
                                 explainer=run.get("explainer"), samples=samples, images=have)
            write_json(inside(dest, f"{f}.json", "feature file"), rec)
            rows.append({"index": f, "frac_nonzero": rec["frac_nonzero"], "maxActApprox": rec["maxActApprox"],
                         "explanation": rec["explanations"][0]["description"] if rec["explanations"] else None,
                         "score": rec["explanations"][0]["score"] if rec["explanations"] else None,
                         "activations": len(rec["activations"])})
        write_json(dest / "index.json", {"schema": SCHEMA, "source": name, "layer": site, "modelId": model,
                                         "features": rows})
        summary["sources"][name] = {"features": len(rows), "explained": sum(r["explanation"] is not None for r in rows)}
    write_json(out / "export.json", summary)
    return summary
