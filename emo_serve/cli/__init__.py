"""`emo-serve` command line: a thin shell over the library (one module per command group).

Heavy imports (torch, vLLM) happen inside the command functions, so `emo-serve --help` is fast.
Bad input (a typed `EmoServeError`, or an OSError on a path the user gave) exits with status 2 and
one line naming what is wrong and where; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Each module defines `register(subparsers)`; its commands set `func` on their parser.
COMMAND_MODULES = ("demo", "subset", "profile", "eval", "serve", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emo-serve",
        description="Profile, export and serve task-specific expert subsets of EMO MoE models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:  # a module that fails to import is a broken install: let it raise
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..errors import EmoServeError

    try:
        return int(args.func(args) or 0)
    except (EmoServeError, OSError) as exc:
        print(f"emo-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
