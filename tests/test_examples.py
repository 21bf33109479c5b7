"""The scripts in examples/ run, so they never rot: the README's "Examples" commands are run as
written (one after the other, in a scratch folder, `python` being this interpreter) with
DIFFLENS_EXAMPLES_TINY=1, and what they print and write is checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_docs import code_blocks, section

ROOT = Path(__file__).resolve().parents[1]


def example_commands() -> list[str]:
    """`python examples/...` commands of the README's Examples section (comments dropped)."""
    out = []
    for block in code_blocks(section((ROOT / "README.md").read_text(encoding="utf-8"), "Examples")):
        for line in block.replace("\\\n", " ").splitlines():
            cmd = line.split("  #")[0].strip()
            if cmd.startswith("python examples/"):
                out.append(cmd)
    return out


def test_readme_lists_every_example():
    scripts = sorted(p.name for p in (ROOT / "examples").glob("[0-9]*.py"))
    listed = [c.split()[1] for c in example_commands()]
    assert listed == [f"examples/{s}" for s in scripts], "README's Examples section must run every script, in order"
    for s in scripts:  # jupytext "percent" scripts: a markdown cell first, then code cells
        lines = (ROOT / "examples" / s).read_text(encoding="utf-8").splitlines()
        assert lines[0] == "# %% [markdown]", s
        assert sum(line == "# %%" for line in lines) >= 4, s


def _png(path: Path) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the output:\n{text}"
    return float(m.group(1))


@pytest.mark.slow
def test_examples_run_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1", DIFFLENS_QUIET="1",
               DIFFLENS_EXAMPLES_TINY="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    printed = {}
    for cmd in example_commands():
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"`{cmd}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        printed[Path(cmd.split()[1]).stem] = r.stdout
    runs = tmp_path / "runs" / "examples"

    # 1. quickstart: a held-out evaluation, a feature that matches an object, a steering sweep
    res = json.loads((runs / "01_quickstart" / "results.json").read_text())
    assert res["rows"] == 12 * 3 * 256  # 12 images x 3 recorded steps x 256 image tokens
    assert 0 < res["fvu"] < 0.8 and res["l0"] == pytest.approx(8)
    assert res["concept"].startswith("object=") and res["match"] > 0.3  # MCC; 0 is chance
    assert res["pixel_change"][0] == 0 and res["pixel_change"][-1] > 0  # steering changed the image
    assert len(res["readings"]) == len(res["pixel_change"])
    assert f"feature {res['feature']} best matches {res['concept']}" in printed["01_quickstart"]
    assert _png(runs / "01_quickstart" / "feature.png")[0] > 100 and _png(runs / "01_quickstart" / "steer.png")[0] > 100
    assert (runs / "01_quickstart" / "dicts" / "topk" / "cfg.json").is_file()

    # 2. a FluxPipeline folder standing in for FLUX.1, through load_adapter / harvest / train / steer
    res = json.loads((runs / "02_your_own_flux" / "results.json").read_text())
    assert (Path(res["model"]) / "model_index.json").is_file() or (tmp_path / res["model"] / "model_index.json").is_file()
    assert res["site"] == "transformer_blocks.1:img" and res["rows"] > 0 and 0 < res["fvu"] < 1
    assert res["pixel_change"][0] == 0 and min(res["pixel_change"][1:]) > 0
    _png(runs / "02_your_own_flux" / "steer.png")

    # 3. the quickstart's dictionary loaded, exported to SAELens and sparsify, edits made with both
    out = printed["03_load_and_steer"]
    assert "topk, 128 latents over d = 128 at 'transformer_blocks.1:img'" in out
    for fmt in ("saelens", "sparsify"):
        assert _number(fmt + r" copy in .*?max \|code difference\| (\S+) over", out) < 1e-4
        assert (runs / "03_load_and_steer" / fmt / "cfg.json").is_file()
    assert out.count("same active latents on 100.0% of them") == 2
    assert _number(r"differs from the original's by at most (\d+) grey levels", out) <= 2
    res = json.loads((runs / "03_load_and_steer" / "results.json").read_text())
    changes = {label: r["pixel_change"] for label, r in res["runs"].items()}
    assert changes["clean"] == 0 and all(v > 0 for label, v in changes.items() if label != "clean"), changes
    assert all(r["reading"] for r in res["runs"].values())  # the toy classifier read every image
    _png(runs / "03_load_and_steer" / "interventions.png")
