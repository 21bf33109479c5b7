"""`difflens <verb>`: each verb module registers its own sub-parser; verbs stay thin over the Python API.

A verb module defines `register(subparsers)` which adds parsers with `set_defaults(func=run)`;
`run(args)` returns an exit code (or None for 0). Raise `DifflensError` for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from difflens.errors import DifflensError

# Order is the order of `difflens --help`; it follows the data flow.
VERB_MODULES = [
    "difflens.world.cli",
    "difflens.models.cli",
    "difflens.models.toy.cli",
    "difflens.harvest.cli",
    "difflens.train.cli",
    "difflens.evaluate.cli",
    "difflens.evaluate.study",
    "difflens.interpret.cli",
    "difflens.intervene.cli",
    "difflens.browse.cli",
    "difflens.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflens",
        description="Dictionary learning on text-to-image diffusion transformers.",
    )
    from difflens import __version__

    parser.add_argument("--version", action="version", version=f"difflens {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in VERB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a stage not built yet must not break the others
            if e.name and e.name.startswith("difflens"):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except DifflensError as e:
        print(f"difflens {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        if os.environ.get("DIFFLENS_DEBUG"):
            raise
        print(f"difflens {args.verb}: error: file not found: {e.filename}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
