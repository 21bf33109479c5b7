"""`difflens <verb>`: each verb module registers its own sub-parser; verbs stay thin over the Python API.

A verb module defines `register(subparsers)` which adds parsers with `set_defaults(func=run)`;
`run(args)` returns an exit code (or None for 0). Raise `DifflensError` for bad input. Flags come
from `difflens.cli_options` so one word means one thing on every verb; `-q/-v` are added here to
every verb. Exit codes: 0 ok, 1 runtime failure, 2 usage error (argparse or DifflensError).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from difflens.cli_options import EXIT_FAILURE, EXIT_USAGE, add_verbosity
from difflens.errors import DifflensError

# Order is the order of `difflens --help`; it follows the data flow.
VERB_MODULES = [
    "difflens.world.cli",
    "difflens.models.cli",
    "difflens.models.toy.cli",
    "difflens.harvest.cli",
    "difflens.store.cli",
    "difflens.train.cli",
    "difflens.evaluate.cli",
    "difflens.evaluate.study_cli",
    "difflens.compare.cli",
    "difflens.interpret.cli",
    "difflens.benchmark.cli",
    "difflens.dictionaries.cli",
    "difflens.intervene.cli",
    "difflens.browse.cli",
    "difflens.demo",
]


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.values()


def _add_verbosity_everywhere(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    """Every verb (and sub-verb) gets -q/-v unless it declares its own; a sub-verb's inherit the
    verb's (`difflens interpret -q cache` is as quiet as `difflens interpret cache -q`)."""
    for sub in _subparsers(parser):
        if "-q" not in sub._option_string_actions and "--quiet" not in sub._option_string_actions:
            add_verbosity(sub, inherit=nested)
        elif "-v" not in sub._option_string_actions:
            sub.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if nested else 0,
                             help="more detail; -v also prints tracebacks")
        _add_verbosity_everywhere(sub, nested=True)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args` plus the verbosity defaults a sub-verb leaves unset (see `add_verbosity`)."""
    args = parser.parse_args(argv)  # usage errors exit 2 here
    for name, default in (("quiet", False), ("verbose", 0)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflens",
        description="Dictionary learning on text-to-image diffusion transformers.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage error.",
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
    _add_verbosity_everywhere(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)  # usage errors exit 2 here
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "quiet", False):
        os.environ["DIFFLENS_QUIET"] = "1"
    debug = bool(os.environ.get("DIFFLENS_DEBUG")) or getattr(args, "verbose", 0) > 0
    try:
        rc = args.func(args)
    except DifflensError as e:
        print(f"difflens {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        if debug:
            raise
        print(f"difflens {args.verb}: error: file not found: {e.filename}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a runtime failure, not the user's input: say so, keep the traceback one flag away
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"difflens {args.verb}: failed: {type(e).__name__}: {first} (run with -v for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
