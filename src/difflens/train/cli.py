"""`difflens train`: a thin layer over `difflens.train.train` (flags and the --config file)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from difflens.cli_options import add_data_option, add_out_option
from difflens.errors import DifflensError
from difflens.train.config import TrainConfig, expand_specs

# TrainConfig fields whose flag is not just --field-name: the CLI's vocabulary keeps `--steps` for
# denoising steps and calls a subset of step indices a step window (difflens.cli_options).
FLAG_NAMES = {"steps": "train-steps", "denoise_steps": "step-window"}
NOT_FLAGS = ("progress",)  # -q/--quiet sets it
METAVARS = {int: "N", float: "X", str: "TEXT", "timestep_range": "LO:HI", "denoise_steps": "W"}


def field_docs(cls) -> dict[str, str]:
    """Help text of each dataclass field: its docstring (a string right after the field) or its
    trailing `# comment`, so the config class is the one place a training option is documented."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    docs = {}
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
            elif node.lineno in comments:
                docs[node.target.id] = comments[node.lineno]
    return docs


def _field_type(f) -> type | None:
    """int / float / str / bool for a simple field annotation (also 'int | None'); None otherwise."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = {t.strip() for t in text.split("|")} - {"None"}
    if len(parts) == 1:
        return {"int": int, "float": float, "str": str, "bool": bool}.get(parts.pop())
    return None


def _flag(name: str, prefix: str = "") -> str:
    return "--" + prefix + FLAG_NAMES.get(name, name.replace("_", "-"))


def _parsers() -> dict:
    """Fields whose flag text needs parsing into the field's value (anything not int/float/str/bool)."""
    return {"timestep_range": parse_range, "denoise_steps": lambda t: parse_steps(t, _flag("denoise_steps"))}


def add_config_flags(p, cls=TrainConfig) -> dict[str, str]:
    """One flag per dataclass field, its help the field's documentation; returns dest -> field.

    Every flag defaults to None so a --config file can fill what the command line leaves out; a
    field added to the config class gets its flag here without touching this file."""
    import dataclasses

    from difflens.train import config as config_module

    docs = field_docs(cls)
    g = p.add_argument_group("training (TrainConfig fields; also settable in the --config file's [train] table)")
    dests = {}
    for f in dataclasses.fields(cls):
        if f.name in NOT_FLAGS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        doc = docs.get(f.name, "")
        kind = _field_type(f)
        dest = f"cfg_{f.name}"
        if kind is bool:
            g.add_argument(_flag(f.name, "no-" if default else ""), dest=dest, action="store_const",
                           const=not default, default=None,
                           help=f"{doc} (on by default; this flag turns it off)" if default else doc)
        else:
            choices = getattr(config_module, f.name.upper() + "S", None)  # e.g. DECAYS for `decay`
            choices = list(choices) if isinstance(choices, tuple) and kind is str else None
            g.add_argument(_flag(f.name), dest=dest, type=kind if kind in (int, float) else str, default=None,
                           choices=choices, metavar=None if choices else METAVARS.get(f.name, METAVARS.get(kind, "VALUE")),
                           help=f"{doc} (default {default})" if default is not None else doc)
        dests[dest] = f.name
    return dests


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train dictionaries (SAE, TIDE, ITDA) on an activation store",
        description="Train one or more dictionaries in lockstep on one pass over an activation store. "
        "Comma lists in --site/--arch/--width/--k train the whole grid together. "
        "Multi-process: torchrun --nproc-per-node N -m difflens train ... . See docs/training.md.",
    )
    add_data_option(p)
    add_out_option(p, kind="dir", help="run folder: one sub-folder per dictionary, plus train_state/")
    p.add_argument("--config", help="JSON or TOML file listing dictionaries (and training settings)")
    p.add_argument("--site", help="site(s), comma-separated: one dictionary per site (a layer sweep)")
    from difflens.dictionaries import ARCHITECTURES  # the registry is the one list of architectures
    from difflens.dictionaries.config import NORMALIZATIONS

    p.add_argument("--arch", help=f"{' | '.join(sorted(ARCHITECTURES))} (comma list for a grid)")
    p.add_argument("--width", help="number of latents (comma list for a grid); for ITDA the atom cap")
    p.add_argument("--k", help="active latents per token (comma list for a grid)")
    p.add_argument("--normalization", choices=list(NORMALIZATIONS),
                   help="input normalisation inside the dictionaries (default scalar; pca-whiten as in the Flux paper)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other field of the architecture's config, e.g. --option itda_tau=0.3 (JSON values)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_flags(p)
    p.set_defaults(func=run)


def parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise DifflensError(f"--timestep-range {text!r}: write lo:hi, e.g. 0.2:0.8") from None
    return lo, hi


def parse_steps(text: str, flag: str = "--step-window") -> list[int]:
    from difflens.cli_options import parse_step_window

    steps = parse_step_window(text, flag)
    if steps is None:
        raise DifflensError(f"{flag} {text!r}: give step indices (a:b or 0,1,2), or leave the flag out for all steps")
    return steps


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise DifflensError(f"config file {p} does not exist")
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(p.read_text(encoding="utf-8"))
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise DifflensError(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise DifflensError(f"config file {p}: expected an object with 'dictionaries' (and optional 'train', 'defaults')")
    unknown = sorted(set(data) - {"train", "defaults", "dictionaries"})
    if unknown:
        raise DifflensError(f"config file {p}: unknown section(s) {', '.join(unknown)}; use train, defaults, dictionaries")
    return data


def _csv(text: str | None, conv=str):
    if text is None:
        return None
    try:
        values = [conv(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"{text!r} is not a comma-separated list of integers") from None
    return values[0] if len(values) == 1 else values


def _options(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise DifflensError(f"--option {item!r}: write KEY=VALUE, e.g. --option tau=0.3")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def build_from_args(args) -> tuple[list, TrainConfig]:
    """The dictionaries and TrainConfig the flags (and --config file) describe."""
    import dataclasses

    file = read_config_file(args.config) if args.config else {}
    train = dict(file.get("train", {}))
    parsers = _parsers()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f"cfg_{f.name}", None)
        if value is None:
            continue
        if f.name in parsers:
            value = parsers[f.name](value)
        if f.name in ("steps", "tokens"):  # a length flag replaces the file's length, whichever it was
            train.pop("steps", None)
            train.pop("tokens", None)
        train[f.name] = value
    if args.quiet:
        train["progress"] = False
    cfg = TrainConfig.from_dict(train)

    cli_dict = {
        "site": _csv(args.site),
        "arch": _csv(args.arch),
        "width": _csv(args.width, int),
        "k": _csv(args.k, int),
        "normalization": args.normalization,
        **_options(args.option),
    }
    cli_dict = {k: v for k, v in cli_dict.items() if v is not None}
    entries = file.get("dictionaries") or [{}]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DifflensError(f"config file {args.config}: 'dictionaries' must be a list of objects")
    defaults = {**file.get("defaults", {}), **cli_dict}
    return expand_specs(entries, defaults), cfg


def run(args: argparse.Namespace) -> int:
    from difflens.train import distributed as ddp
    from difflens.train.trainer import Interrupted, train

    specs, cfg = build_from_args(args)
    env = ddp.init_from_env()
    if not env.is_main:  # every rank runs the same code: let rank 0 alone speak
        warnings.simplefilter("ignore")
    try:
        if env.is_main and cfg.progress:
            names = ", ".join(s.name for s in specs)
            print(f"training {len(specs)} dictionar{'y' if len(specs) == 1 else 'ies'} ({names}) "
                  f"for {cfg.total_steps()} steps of {cfg.batch_size} tokens on {env.world_size} process(es)", file=sys.stderr)
        train(args.data, specs, cfg, args.out, resume=args.resume)
    except Interrupted as e:
        if env.is_main:
            print(f"difflens train: {e}", file=sys.stderr)
        return 130
    finally:
        ddp.shutdown(env)
    return 0


__all__ = ["register", "run", "build_from_args"]
