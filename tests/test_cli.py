import os
import subprocess
import sys

import pytest


def run(*args):
    env = dict(os.environ, DIFFLENS_QUIET="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "difflens", *args], capture_output=True, text=True, env=env)


def test_help_lists_verbs():
    r = run("--help")
    assert r.returncode == 0
    for verb in ("generate", "world", "zoo", "harvest", "sites"):
        assert verb in r.stdout


def test_generate_writes_png_and_grid(tmp_path):
    out = tmp_path / "one.png"
    r = run("generate", "--prompt", "a red circle", "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    grid = tmp_path / "grid.png"
    r = run("generate", "--prompt", "a red circle", "--prompt", "a blue square", "--grid", "--steps", "2", "--out", str(grid))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    w, h = Image.open(grid).size
    assert w > 2 * 128 and h > 128


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt", "a purple circle"], "purple"),
        (["--prompt", "a red circle", "--seed", "-1"], "seed"),
        (["--prompt", "a red circle", "--steps", "0"], "steps"),
        (["--prompt", "a red circle", "--out", "/nonexistent/dir/x.png"], "does not exist"),
        (["--prompt", "a red circle", "--out", "x.jpg"], ".png"),
    ],
)
def test_generate_errors_are_one_line(tmp_path, args, needle):
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "x.png")]
    r = run("generate", *args)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_world_sample(tmp_path):
    r = run("world", "sample", "--n", "3", "--out", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    import json

    rec = json.loads((tmp_path / "w" / "scene_00001.json").read_text())
    assert {"prompt", "scene", "concepts", "token_labels", "token_owner"} <= rec.keys()
    assert len(rec["token_labels"]) == 256
    assert (tmp_path / "w" / "scene_00002.png").exists()
    r = run("world", "sample", "--n", "0", "--out", str(tmp_path / "w2"))
    assert r.returncode != 0 and "--n" in r.stderr and "Traceback" not in r.stderr


def test_zoo_train_rejects_a_negative_aux_weight(tmp_path):
    r = run("zoo", "train", "toy", "--aux-object-weight", "-1", "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "--aux-object-weight must be >= 0" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "t").exists()
