"""One set of model options on every verb: tiny random Flux, SD3, PixArt and DiT pipelines saved to
folders and driven through the CLI with --model-dtype bf16, the model's default steps, --height/
--width and --max-text-length; harvest --dry-run predicts exactly the rows a harvest writes."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from difflens.cli import main
from difflens.errors import DifflensError
from difflens.models import load_adapter

ROOT = Path(__file__).resolve().parents[1]

# family -> (prompt, size flags, default steps of its pipeline)
FAMILIES = {
    "flux": ("a red cat", ["--height", "32", "--width", "32", "--max-text-length", "16"], 4),  # schnell: 4 steps
    "sd3": ("a red cat", [], 28),
    "pixart": ("a red cat", [], 20),
    "dit": ("207", [], 50),
}


@pytest.fixture(scope="module")
def folders(tiny_folders):
    return tiny_folders  # saved once per session (conftest.TinyFolders)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_knows_its_default_steps(family, folders):
    adapter = load_adapter(str(folders[family]), dtype="bf16")
    assert adapter.default_steps == FAMILIES[family][2]
    assert len(adapter.timesteps()) == adapter.default_steps  # one timesteps() signature, default steps included
    assert all(p.dtype == torch.bfloat16 for p in adapter.transformer.parameters())


@pytest.mark.parametrize("family, steps", [("flux", []), ("dit", ["--steps", "2"])])
def test_generate_bf16_and_sidecar(family, steps, folders, tmp_path, capsys):
    prompt, size, default = FAMILIES[family]
    out = tmp_path / "img.png"
    rc = main(["generate", "--model", str(folders[family]), "--model-dtype", "bf16", "--prompt", prompt, *size, *steps,
               "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["prompt"] == prompt and meta["seed"] == 0 and meta["model_dtype"] == "bf16"
    assert meta["steps"] == (int(steps[1]) if steps else default) == len(meta["timesteps"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["images"] == [str(out)]  # stdout: the JSON only
    assert "wrote" in captured.err


def test_harvest_bf16_matches_its_dry_run(folders, tmp_path, capsys):
    """SD3's transformer loads in fp32 whatever diffusers is asked; it now runs in bf16 end to end."""
    family = "sd3"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\na green bird\n")
    size = FAMILIES[family][1]
    args = ["harvest", "--model", str(folders[family]), "--model-dtype", "bf16", "--prompts", str(prompts),
            "--steps", "2", "--seeds", "0,1", "--tokens-per-image", "8", "--store-dtype", "bf16",
            "--max-text-length", "8", "--batch-size", "3", *size, "--out", str(tmp_path / "store"), "--json"]
    assert main([*args, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "store").exists()  # a dry run writes nothing
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_written"] == plan["rows"] == 3 * 2 * 2 * 8
    shards = sum(p.stat().st_size for p in (tmp_path / "store" / "shards").iterdir())
    assert plan["activation_bytes"] <= shards < plan["activation_bytes"] * 3 + 20_000  # + header and stats


def test_harvest_dry_run_counts_text_tokens_and_the_toy(folders, tmp_path, capsys):
    assert main(["harvest", "--model", str(folders["flux"]), "--num-prompts", "2", "--sites", "transformer_blocks.0:txt",
                 "--max-text-length", "16", "--height", "64", "--width", "64", "--out", str(tmp_path / "s"),
                 "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["sites"]["transformer_blocks.0:txt"]["tokens"] == 16 and plan["steps"] == 4
    assert plan["height"] == 64 and plan["free_bytes"] > 0
    assert main(["harvest", "--model", "toy", "--num-prompts", "10", "--steps", "12", "--step-window", "0,6",
                 "--token-fraction", "0.25", "--out", str(tmp_path / "t"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    site = plan["sites"]["transformer_blocks.1:img"]
    assert site["tokens"] == 64 and site["rows"] == 10 * 2 * 64
    assert site["bytes"] == site["rows"] * (128 * 4 + 41 + 8)  # fp32 + metadata + toy concept labels


def test_model_option_errors_are_usage_errors(folders, tmp_path, capsys):
    base = ["generate", "--model", str(folders["dit"]), "--prompt", "207", "--out", str(tmp_path / "x.png")]
    if not torch.cuda.is_available():
        assert main([*base, "--offload", "model"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    assert main([*base, "--max-text-length", "8"]) == 2
    assert "takes no text" in capsys.readouterr().err
    assert main([*base, "--height", "64"]) == 2
    assert "only generates 32x32" in capsys.readouterr().err
    assert main(["generate", "--model", "toy", "--prompt", "a red circle", "--max-text-length", "3",
                 "--out", str(tmp_path / "y.png")]) == 2
    assert "fixed at" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written on a usage error


def test_enforce_dtype_names_the_component(folders):
    from difflens.models._pipeline import enforce_dtype

    adapter = load_adapter(str(folders["sd3"]), dtype="bf16")
    comps = {k: v for k, v in adapter.pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert all(p.dtype == torch.bfloat16 for c in comps.values() for p in c.parameters())

    class Stubborn(torch.nn.Linear):  # a component whose parameters refuse to change dtype
        def named_parameters(self, *a, **k):
            for n, p in super().named_parameters(*a, **k):
                yield n, p.detach().clone().requires_grad_(False)

    class Pipe:
        components = {"text_encoder_9": Stubborn(2, 2)}

    with pytest.raises(DifflensError, match="component 'text_encoder_9'.*--model-dtype fp32"):
        enforce_dtype(Pipe(), torch.bfloat16, model_id="m")


def test_quant_extra_brings_what_nf4_needs(monkeypatch):
    """`pip install '.[quant]'` = bitsandbytes + accelerate (diffusers' 4-bit loader needs both); the
    error names exactly what is missing, and the import path difflens uses resolves."""
    import importlib

    from difflens.models import _loading

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["quant"]
    names = {e.split(">")[0].split("=")[0].split("<")[0].strip().lower() for e in extra}
    assert {"bitsandbytes", "accelerate"} <= names
    from diffusers import BitsAndBytesConfig  # noqa: F401  (the class quantization_config builds)

    real = importlib.import_module

    def only(present):
        def fake(name, *a, **k):
            if name in ("bitsandbytes", "accelerate") and name not in present:
                raise ImportError(name)
            return real(name, *a, **k) if name not in present else object()
        return fake

    for present, missing in [((), ("bitsandbytes", "accelerate")), (("bitsandbytes",), ("accelerate",)),
                             (("bitsandbytes", "accelerate"), ())]:
        if torch.cuda.is_available() and not missing:
            continue  # on a GPU machine with both packages the config is built, not refused
        monkeypatch.setattr(_loading.importlib, "import_module", only(present))
        with pytest.raises(DifflensError) as e:
            _loading.quantization_config("nf4", torch.bfloat16, torch.device("cpu"))
        for pkg in ("bitsandbytes", "accelerate"):
            assert (f"the {pkg} package" in str(e.value)) == (pkg in missing)
        if not torch.cuda.is_available():
            assert "CUDA" in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NF4 loading runs on CUDA only; this machine has no GPU")
def test_nf4_loads_on_cuda(folders):  # pragma: no cover - CPU-only CI
    adapter = load_adapter(str(folders["flux"]), dtype="bf16", device="cuda", quantize="nf4")
    assert adapter.generate(["a cat"], [0], steps=1, height=32, width=32).images.shape == (1, 32, 32, 3)


def test_grids_are_capped_at_a_display_size():
    from difflens.viz import MAX_SIDE, labelled_grid

    big = [np.full((1024, 1024, 3), 40 * i, np.uint8) for i in range(6)]
    grid = labelled_grid(big, [f"scale {i}" for i in range(6)], cols=6)
    assert max(grid.shape[:2]) <= MAX_SIDE
    small = labelled_grid([np.zeros((32, 32, 3), np.uint8)] * 2, ["a", "b"])
    assert small.shape[1] >= 2 * 128  # toy images are still enlarged to be seen


def test_a_harvest_failing_before_its_first_unit_leaves_nothing(tmp_path, monkeypatch, capsys):
    from difflens.models.toy.adapter import ToyAdapter

    def broken(self, *a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ToyAdapter, "generate", broken)
    out = tmp_path / "store"
    assert main(["harvest", "--model", "toy", "--num-prompts", "2", "--steps", "2", "--out", str(out)]) == 1
    assert "out of memory" in capsys.readouterr().err
    assert not out.exists()  # the rerun is not blocked by a half-made store
    out.mkdir()  # a folder the user made is never removed
    assert main(["harvest", "--model", "toy", "--num-prompts", "2", "--steps", "2", "--out", str(out)]) == 1
    assert out.exists()
