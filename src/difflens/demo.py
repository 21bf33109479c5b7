"""`difflens demo` (what `make demo` runs): the whole pipeline on the embedded toy model.

Each stage adds itself here as it lands; the demo ends with a summary and the output path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from difflens.utils import atomic_write_text, save_image

DEMO_PROMPTS = [
    "a small red circle in the top left on a black plain background",
    "a large blue square in the center on a gray plain background",
    "a large yellow triangle in the bottom right on a navy stripes background",
    "a small green seven in the top right on a black dots background",
    "a large white three in the bottom left on a navy plain background",
    "a large magenta circle in the center on a gray stripes background",
    "a small cyan two in the bottom right and a large red square in the top left on a black plain background",
    "a large green triangle in the top right and a small yellow five in the bottom left on a gray dots background",
]


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded toy model")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.set_defaults(func=run)


def stage_generate(out: Path, summary: dict) -> None:
    # Stage imports stay inside the stages: the CLI imports this module at start-up, before torch.
    from difflens.models import load_adapter
    from difflens.viz import labelled_grid

    adapter = load_adapter("toy")
    seeds = list(range(len(DEMO_PROMPTS)))
    gen = adapter.generate(DEMO_PROMPTS, seeds)
    path = out / "generate" / "grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, labelled_grid(list(gen.images), DEMO_PROMPTS, cols=4, label_lines=5))
    acc = adapter.ground_truth().adherence(DEMO_PROMPTS, gen.images)
    summary["generate"] = {
        "grid": str(path),
        "prompt_adherence (classifier)": {k: round(v, 3) for k, v in acc["accuracy"].items() if v is not None},
    }


MAIN_SITE = "transformer_blocks.1:img"
NEURON_SITE = "transformer_blocks.1.ff.net.0:img"
# Where `difflens trace` finds colour and background decided: the prompt's words in block 0's text
# stream. The intervention study acts there (docs/intervene.md).
TEXT_SITE = "transformer_blocks.0:txt"
# The text tokens entering block 0: objects move there (block 0's image stream reads the prompt
# before an edit of block 0's text output acts), so the study's object rows use dictionaries here.
OBJECT_SITE = "context_embedder:txt"
ARCHS = ("topk", "tide", "itda")


def _cli(argv: list[str]) -> None:
    """Run a stage through the real CLI, so the demo exercises what users type."""
    from difflens.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"demo stage failed: difflens {' '.join(argv)} (exit {rc})")


def stage_harvest(out: Path, summary: dict) -> None:
    store = out / "store"
    _cli(["harvest", "--model", "toy", "--num-prompts", "160", "--steps", "12", "--step-window", "0,3,6,9,11",
          "--sites", f"transformer_blocks.*:img,single_transformer_blocks.*:img,{NEURON_SITE},{TEXT_SITE},{OBJECT_SITE}",
          "--store-dtype", "bf16", "--batch-size", "32", "--out", str(store)]
         + (["--resume"] if (store / "manifest.json").exists() else []))
    from difflens.store import Store

    s = Store(store)
    summary["harvest"] = {"store": str(store), "rows_per_site": {site: s.num_rows(site) for site in s.sites}}


def stage_train(out: Path, summary: dict) -> None:
    config = {
        "defaults": {"site": MAIN_SITE, "width": 1024, "k": 16},
        "dictionaries": [{"name": a, "arch": a} for a in ARCHS]
        + [{"name": f"{a}_txt", "arch": a, "site": TEXT_SITE, "width": 512, "k": 8} for a in ARCHS]
        # appended last: a dictionary's initial weights are seeded by its position in this list
        + [{"name": f"{a}_ctx", "arch": a, "site": OBJECT_SITE, "width": 512, "k": 8} for a in ARCHS],
    }
    cfg_path = out / "train_config.json"
    atomic_write_text(cfg_path, json.dumps(config, indent=2) + "\n")
    run = out / "dicts"
    _cli(["train", "--data", str(out / "store"), "--config", str(cfg_path), "--train-steps", "400",
          "--batch-size", "1024", "--dead-after-tokens", "100000", "--out", str(run)] + (["--resume"] if run.exists() else []))
    summary["train"] = {"dictionaries": {n: str(run / n) for n in ARCHS},
                        "text_dictionaries": {n: str(run / f"{n}_txt") for n in ARCHS},
                        "object_dictionaries": {n: str(run / f"{n}_ctx") for n in ARCHS}}


def stage_evaluate(out: Path, summary: dict) -> None:
    dicts = summary["train"]["dictionaries"]
    args = ["evaluate", "--data", str(out / "store"), "--out", str(out / "evaluate"), "--splice", "--model", "toy"]
    for d in dicts.values():
        args += ["--dict", d]
    (out / "evaluate").mkdir(exist_ok=True)
    _cli(args)
    summary["evaluate"] = {"report": str(out / "evaluate" / "eval.json")}


def stage_interpret(out: Path, summary: dict) -> None:
    from difflens.interpret import run_oracle_pipeline

    report = run_oracle_pipeline(summary["train"]["dictionaries"], out / "store", out / "interpret",
                                 neuron_site=NEURON_SITE, n_features=48)
    summary["interpret"] = {"out": str(out / "interpret"), "table": report.get("table", report)}


DEMO_CASES = 40  # per row (the demo stays under 10 minutes); `difflens intervene-study` defaults to 100 (README numbers)
# every row of the study; the object rows run on the `_ctx` dictionaries (OBJECT_SITE), the others on `_txt`
DEMO_ROWS = ("color edit", "color steer", "object edit", "color ablation", "color transfer",
             "object transfer (all features)", "background transfer")


def stage_intervene(out: Path, summary: dict) -> None:
    import difflens
    from difflens.intervene.study_concepts import run_concept_study
    from difflens.models import load_adapter
    from difflens.store import Store
    from difflens.trace.demo import run_trace_demo

    adapter = load_adapter("toy")
    summary["trace"] = run_trace_demo(out / "trace", adapter)
    dicts = {n: difflens.load(d) for n, d in summary["train"]["text_dictionaries"].items()}
    objects = {n: difflens.load(d) for n, d in summary["train"]["object_dictionaries"].items()}
    res = run_concept_study(adapter, dicts, Store(out / "store"), out / "intervene", n=DEMO_CASES, rows=DEMO_ROWS,
                            references=("difference of means", "random direction"), object_dictionaries=objects)
    r3 = lambda x: None if x is None else round(float(x), 3)  # noqa: E731
    summary["intervene"] = {
        "table": res["files"]["table"], "examples": res["files"]["examples"], "images_per_second": res["images_per_second"],
        "success": {n: {row: r3(e["success_rate"]) for row, e in d["rows"].items()} for n, d in res["dictionaries"].items()},
        "kept": {n: {row: r3(e["kept_rate"]) for row, e in d["rows"].items()} for n, d in res["dictionaries"].items()},
        "references": {row: r3(e.get("success_rate")) for row, e in res["references"].items() if isinstance(e, dict)},
        "images": res["images"], "seconds": res["seconds"],
        "images_per_row": {n: {row: e["images"] for row, e in d["rows"].items()} for n, d in res["dictionaries"].items()},
    }


def stage_browse(out: Path, summary: dict) -> None:
    """Export the feature browser over the demo's dictionaries, interpretation and evaluation."""
    site = out / "site"
    args = ["browse", "export", "--out", str(site), "--interp", str(out / "interpret"),
            "--eval", str(out / "evaluate" / "eval.json"), "--data", str(out / "store")]
    for d in summary["train"]["dictionaries"].values():
        args += ["--dict", d]
    _cli(args)
    summary["browse"] = {"site": str((site / "index.html").resolve())}


STAGES = [
    ("generate", stage_generate),
    ("harvest", stage_harvest),
    ("train", stage_train),
    ("evaluate", stage_evaluate),
    ("interpret", stage_interpret),
    ("intervene", stage_intervene),
    ("browse", stage_browse),
]


def _first_table(path: Path) -> str:
    """The first markdown table of a report, as written by the stage itself."""
    if not path.exists():
        return f"(missing: {path})"
    lines, started = [], False
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            lines.append(line)
            started = True
        elif started:
            break
    return "\n".join(lines)


def _readable_summary(out: Path, summary: dict) -> str:
    """What a person wants at the end of the demo: the tables, not the JSON."""
    parts = ["", "== demo summary"]
    adh = summary.get("generate", {}).get("prompt_adherence (classifier)")
    if adh:
        parts.append("toy model prompt adherence on the demo grid: " + ", ".join(f"{k} {v:.0%}" for k, v in adh.items()))
    parts += ["", "reconstruction (held-out):", _first_table(out / "evaluate" / "eval.md")]
    parts += ["", "oracle autointerpretation vs baselines:", _first_table(out / "interpret" / "comparison.md")]
    tr = summary.get("trace", {})
    if tr:
        parts += ["", "where each factor is decided (activation patching, whole run, both CFG branches; "
                  "full map: difflens trace):"] + ["  " + line for line in tr.get("summary", [])]
    iv = summary.get("intervene", {})
    if iv:
        parts += ["", f"interventions where the concept is decided ({DEMO_CASES} cases per row; each row says its site: "
                  f"the {TEXT_SITE} dictionaries where the concept features fire, the {OBJECT_SITE} ones for objects; "
                  "cell: success (n) / other factors kept; full study: difflens intervene-study):",
                  _first_table(out / "intervene" / "concepts.md")]
    secs = summary.get("seconds", {})
    parts += ["", "stage seconds: " + ", ".join(f"{k} {v}" for k, v in secs.items()), ""]
    return "\n".join(parts)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    t0 = time.time()
    for name, stage in STAGES:
        t = time.time()
        print(f"== demo: {name}", flush=True)
        stage(out, summary)
        summary.setdefault("seconds", {})[name] = round(time.time() - t, 1)
    summary["seconds"]["total"] = round(time.time() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(_readable_summary(out, summary))
    print(f"demo outputs: {out.resolve()} (all numbers: {out.resolve() / 'summary.json'})")
    if "browse" in summary:
        print(f"feature browser: {summary['browse']['site']}")
    return 0
