"""The CLI's vocabulary, declared once: every verb builds its flags from these groups.

One word, one meaning, on every verb:

- `--steps N`           denoising steps (default: the model's own). Optimizer steps are `--train-steps`.
- `--step-window W`     a subset of denoising step indices: `a:b` (b excluded, `:5` = first 5) or `0,2,4`.
- `--timestep-range`    scheduler timestep *values* `lo:hi` (inclusive); never step indices.
- `--model-dtype`       the dtype the model runs in; `--store-dtype` the dtype a store keeps.
- `--data DIR`          an activation store, everywhere.
- `--out`               a folder when a verb writes several files, a file when it writes one
                        (an image's JSON sidecar counts as part of it).
- `-q/--quiet`, `-v/--verbose`  on every verb (added by `difflens.cli`, not by each verb).
- `--seed N`            one RNG seed; `--seeds 0,1,2` noise seeds, one image per seed.

Exit codes: 0 success, 1 a runtime failure, 2 a usage error (bad flags or input; `DifflensError`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difflens.errors import DifflensError
from difflens.models import DEFAULT_MODEL

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

MODEL_DTYPES = ("fp32", "bf16", "fp16")
STORE_DTYPES = ("fp32", "bf16")
OFFLOAD = ("none", "model", "sequential")


# ---- model: what to load and how ------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser, *, default: str | None = DEFAULT_MODEL, required: bool = False,
                      help_suffix: str = "") -> argparse._ArgumentGroup:
    """--model, --device, --model-dtype, --quantize, --offload, --max-text-length."""
    g = p.add_argument_group("model" + (f" ({help_suffix})" if help_suffix else ""))
    g.add_argument("--model", default=default, required=required,
                   help="'toy', a diffusers pipeline folder or a hub id" + (f" (default: {default})" if default else ""))
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--model-dtype", default="fp32", choices=MODEL_DTYPES,
                   help="dtype the whole pipeline runs in (default fp32; bf16 is fine on CPU, fp16 GPU only)")
    g.add_argument("--quantize", default=None, choices=["nf4"],
                   help="load the transformer in 4-bit NF4 (CUDA + pip install 'difflens[quant]')")
    g.add_argument("--offload", default="none", choices=OFFLOAD,
                   help="CPU offload (CUDA): model = one component on the GPU at a time, sequential = one layer "
                   "(slowest, least memory); default none")
    g.add_argument("--max-text-length", type=int, default=None, metavar="N",
                   help="text tokens the encoder pads/truncates prompts to (default: the model's; Flux 512)")
    return g


def model_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `difflens.models.load_adapter` that the model options describe."""
    return {
        "dtype": args.model_dtype,
        "device": args.device,
        "quantize": args.quantize,
        "offload": args.offload,
        "max_text_length": args.max_text_length,
    }


def load_model(args: argparse.Namespace, model: str | None = None):
    """Load the adapter the model options name (`model` overrides --model)."""
    from difflens.models import load_adapter

    return load_adapter(model or args.model, **model_kwargs(args))


# ---- generation: how to sample ------------------------------------------------------------------
def add_generation_options(p: argparse.ArgumentParser, *, steps_default: int | None = None) -> argparse._ArgumentGroup:
    """--steps (denoising), --guidance, --height, --width."""
    g = p.add_argument_group("generation")
    add_steps_option(g, default=steps_default)
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the model's; Flux-dev's embedded guidance, CFG scale elsewhere)")
    g.add_argument("--height", type=int, default=None, metavar="PX", help="image height (default: the model's)")
    g.add_argument("--width", type=int, default=None, metavar="PX", help="image width (default: the model's)")
    return g


def generation_kwargs(args: argparse.Namespace) -> dict:
    """`steps/guidance/height/width` for `Adapter.generate`; `steps` None means the model's default."""
    steps = getattr(args, "steps", None)
    if steps is not None and steps < 1:
        raise DifflensError(f"--steps must be >= 1 (denoising steps), got {steps}")
    for name in ("height", "width"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise DifflensError(f"--{name} must be a positive number of pixels, got {v}")
    return {"steps": steps, "guidance": getattr(args, "guidance", None), "height": getattr(args, "height", None),
            "width": getattr(args, "width", None)}


def add_step_window(p, *, help: str | None = None) -> None:
    """--step-window: a subset of denoising step indices (never the number of steps)."""
    p.add_argument("--step-window", default=None, metavar="W",
                   help=help or "denoising step indices: a:b (b excluded; ':5' = the first 5) or a list 0,2,4")


def parse_step_window(text: str | None, flag: str = "--step-window") -> list[int] | None:
    """'a:b' -> [a..b-1], '0,2,4' -> [0,2,4], None/'all' -> None. Open ends need the step count: use
    `difflens.intervene.region.Window` for those."""
    if text is None or str(text).strip().lower() == "all":
        return None
    t = str(text).strip()
    try:
        if ":" in t:
            a, b = (int(v) for v in t.split(":"))
            if not 0 <= a < b:
                raise ValueError
            return list(range(a, b))
        vals = [int(v) for v in t.split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"{flag} {text!r}: write step indices as a:b (b excluded, a < b) or 0,2,4") from None
    if not vals or min(vals) < 0:
        raise DifflensError(f"{flag} {text!r}: step indices are integers >= 0")
    return vals


# ---- data, output, seeds ------------------------------------------------------------------------
def add_steps_option(p, *, default: int | None = None, help: str | None = None) -> None:
    """--steps N: the number of denoising steps, on every verb that generates."""
    p.add_argument("--steps", type=int, default=default, metavar="N",
                   help=help or "denoising steps (default: " + (str(default) if default else "the model's own; toy 12, "
                   "FLUX.1-schnell 4") + ")")


def add_data_option(p, *, required: bool = True, help: str | None = None) -> None:
    p.add_argument("--data", required=required, metavar="DIR",
                   help=help or "activation store folder (written by `difflens harvest`)")


def add_out_option(p, *, kind: str, required: bool = True, help: str | None = None, default=None) -> None:
    """kind 'dir' (several files) or 'file' (one file, maybe with a JSON sidecar)."""
    if kind not in ("dir", "file", "file-or-dir"):
        raise ValueError(kind)
    metavar = {"dir": "DIR", "file": "FILE", "file-or-dir": "PATH"}[kind]
    p.add_argument("--out", required=required, default=default, metavar=metavar,
                   help=help or ("output folder" if kind == "dir" else "output file"))


def out_dir(path: str | Path, flag: str = "--out", *, kind: str | None = None, accept_if=None) -> Path:
    """A folder to write several files into: refuse an existing file; with `kind`, also a folder
    holding files this kind of command did not write (`difflens.outdir`; claim it before writing)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DifflensError(f"{flag} {path}: is a file, but this verb writes several files into a folder; pass a folder")
    if kind is not None:
        from difflens.outdir import check_out_dir

        check_out_dir(p, kind, flag=flag, accept_if=accept_if)
    return p


def out_file(path: str | Path, suffix: str, flag: str = "--out") -> Path:
    """One file with `suffix` whose folder exists (or is created by the verb)."""
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise DifflensError(f"{flag} {path!r} must end in {suffix}")
    if p.is_dir():
        raise DifflensError(f"{flag} {path}: is a folder; give a file name ending in {suffix}")
    return p


def add_seed_option(p, *, default: int = 0, help: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=default, help=help or f"random seed (default {default})")


def add_seeds_option(p, *, default: str = "0", help: str | None = None) -> None:
    p.add_argument("--seeds", default=default, metavar="S,S,..",
                   help=help or f"comma-separated noise seeds; every prompt runs with every seed (default {default})")


def parse_int_list(text: str, flag: str, *, minimum: int | None = 0) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise DifflensError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise DifflensError(f"{flag} names no value")
    if minimum is not None and any(v < minimum for v in vals):
        raise DifflensError(f"{flag} values must be >= {minimum}, got {text!r}")
    return vals


# ---- verbosity and output channels ---------------------------------------------------------------
def add_verbosity(p: argparse.ArgumentParser, *, inherit: bool = False) -> None:
    """-q/--quiet and -v/--verbose; `difflens.cli` adds them to every verb.

    inherit: for a sub-verb (`interpret cache`) whose verb has them too. argparse copies every
    value of the sub-verb's namespace over the verb's, so a default here would undo
    `difflens interpret -q cache`; with no default the verb's value stands and
    `difflens.cli.main` fills in False/0 when neither level gave the flag."""
    g = p.add_argument_group("output")
    q_default, v_default = (argparse.SUPPRESS, argparse.SUPPRESS) if inherit else (False, 0)
    g.add_argument("-q", "--quiet", action="store_true", default=q_default,
                   help="no progress bars or messages (errors still print)")
    g.add_argument("-v", "--verbose", action="count", default=v_default, help="more detail; -v also prints tracebacks")


def add_json_option(p) -> None:
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")


def say(args: argparse.Namespace | None, *parts) -> None:
    """A message for the person at the terminal: stderr, silent under -q (stdout is for data)."""
    import sys

    if args is not None and getattr(args, "quiet", False):
        return
    print(*parts, file=sys.stderr)


def emit_json(obj) -> None:
    """Machine-readable output: the only thing a verb prints on stdout."""
    import json
    import sys

    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


__all__ = [
    "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "add_model_options", "model_kwargs", "load_model",
    "add_generation_options", "generation_kwargs", "add_step_window", "parse_step_window", "add_data_option",
    "add_out_option", "out_dir", "out_file", "add_seed_option", "add_seeds_option", "parse_int_list",
    "add_verbosity", "add_json_option", "say", "emit_json",
]
