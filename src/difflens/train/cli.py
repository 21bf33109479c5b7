"""`difflens train`: a thin layer over `difflens.train.train` (flags and the --config file)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from difflens.errors import DifflensError
from difflens.train.config import TrainConfig, expand_specs

# flag dest -> TrainConfig field (all default to None so a --config file can fill them)
_TRAIN_FLAGS = {
    "batch_size": "batch_size",
    "steps": "steps",
    "tokens": "tokens",
    "lr": "lr",
    "warmup_steps": "warmup_steps",
    "decay": "decay",
    "decay_fraction": "decay_fraction",
    "grad_clip": "grad_clip",
    "dead_after_tokens": "dead_after_tokens",
    "seed": "seed",
    "timestep_range": "timestep_range",
    "denoise_steps": "denoise_steps",
    "init_tokens": "init_tokens",
    "eval_tokens": "eval_tokens",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "log_every": "log_every",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train dictionaries (SAE, TIDE, ITDA) on an activation store",
        description="Train one or more dictionaries in lockstep on one pass over an activation store. "
        "Comma lists in --site/--arch/--width/--k train the whole grid together. "
        "Multi-process: torchrun --nproc-per-node N -m difflens train ... . See docs/training.md.",
    )
    p.add_argument("--data", required=True, help="activation store folder (from `difflens harvest`)")
    p.add_argument("--out", required=True, help="run folder: one sub-folder per dictionary, plus train_state/")
    p.add_argument("--config", help="JSON or TOML file listing dictionaries (and training settings)")
    p.add_argument("--site", help="site(s), comma-separated: one dictionary per site (a layer sweep)")
    p.add_argument("--arch", help="topk | batchtopk | relu | tide | itda (comma list for a grid)")
    p.add_argument("--width", help="number of latents (comma list for a grid); for ITDA the atom cap")
    p.add_argument("--k", help="active latents per token (comma list for a grid)")
    p.add_argument("--normalize", choices=["none", "scalar", "per-timestep", "pca-whiten"],
                   help="input normalisation inside the dictionaries (default scalar; pca-whiten as in the Flux paper)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other dictionary option, e.g. --option tau=0.3 (JSON values)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--tokens", type=int, help="training tokens (steps = tokens / batch size)")
    p.add_argument("--batch-size", type=int, help="tokens per step across all processes (default 1024)")
    p.add_argument("--lr", type=float, help="base learning rate (default 2e-4, times each dictionary's lr scale)")
    p.add_argument("--no-lr-scale", action="store_true", help="use --lr as is for every width")
    p.add_argument("--warmup-steps", type=int, help="linear lr warm-up (default 100)")
    p.add_argument("--decay", choices=["none", "linear", "cosine"], help="lr decay to 0 at the end (default none)")
    p.add_argument("--decay-fraction", type=float, help="share of the steps the decay spans (default 0.2)")
    p.add_argument("--grad-clip", type=float, help="max grad norm (default 10; 0 = off)")
    p.add_argument("--no-auxk", action="store_true", help="disable the dead-latent auxiliary loss")
    p.add_argument("--dead-after-tokens", type=int, help="tokens without activation before a latent counts as dead")
    p.add_argument("--seed", type=int, help="data order and initialisation seed (default 0)")
    p.add_argument("--timestep-range", help="train only on timesteps lo:hi (inclusive)")
    p.add_argument("--denoise-steps", help="train only on these step indices: 0,1,2 or 0:3 (end excluded)")
    p.add_argument("--init-tokens", type=int,
                   help="rows for data-dependent init: normalisation statistics, b_dec (default 16384; PCA needs > 2·d)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens for evaluation (default 8192; 0 = none)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default 500)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 1000)")
    p.add_argument("--log-every", type=int, help="steps between training-loss records (default 10)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise DifflensError(f"--timestep-range {text!r}: write lo:hi, e.g. 0.2:0.8") from None
    return lo, hi


def parse_steps(text: str) -> list[int]:
    try:
        if ":" in text:
            a, b = (int(v) for v in text.split(":"))
            return list(range(a, b))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"--denoise-steps {text!r}: write 0,1,2 or 0:3") from None


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
    file = read_config_file(args.config) if args.config else {}
    train = dict(file.get("train", {}))
    for dest, name in _TRAIN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "timestep_range":
            value = parse_range(value)
        elif dest == "denoise_steps":
            value = parse_steps(value)
        if name in ("steps", "tokens"):  # a length flag replaces the file's length, whichever it was
            train.pop("steps", None)
            train.pop("tokens", None)
        train[name] = value
    if args.no_lr_scale:
        train["scale_lr"] = False
    if args.no_auxk:
        train["auxk"] = False
    if args.quiet:
        train["progress"] = False
    cfg = TrainConfig.from_dict(train)

    cli_dict = {
        "site": _csv(args.site),
        "arch": _csv(args.arch),
        "width": _csv(args.width, int),
        "k": _csv(args.k, int),
        "normalization": args.normalize,
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
                  f"for {cfg.total_steps()} steps of {cfg.batch_size} tokens on {env.world_size} process(es)")
        train(args.data, specs, cfg, args.out, resume=args.resume)
    except Interrupted as e:
        if env.is_main:
            print(f"difflens train: {e}")
        return 130
    finally:
        ddp.shutdown(env)
    return 0


__all__ = ["register", "run", "build_from_args"]
