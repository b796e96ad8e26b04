"""`emo-serve eval`: what each subset costs on held-out task text, next to the base."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="measure the quality a subset loses against its base",
        description="Stream the base one layer at a time over held-out examples and score the base "
        "and every subset together: perplexity, next-token accuracy, agreement with the base, router "
        "mass kept per layer, parameters and bytes. Prints a table; -o writes the JSON report.")
    p.add_argument("--base", required=True, help="base checkpoint: directory, fsspec URL or Hub id")
    p.add_argument("--subset", action="append", default=[], type=Path, metavar="SUBSET.json",
                   help="subset manifest made for this base (repeatable; none = base only)")
    p.add_argument("--examples", required=True, type=Path,
                   help="held-out examples: JSONL ({'text'} or {'messages'} per line), a JSON list, or "
                   "text with examples separated by blank lines")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (default: float32)")
    p.add_argument("--max-tokens-per-example", type=positive_int, default=512, metavar="N",
                   help="truncate longer examples (default 512)")
    p.add_argument("-o", "--output", type=Path, help="write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from ..evaluate import evaluate
    from ..files import atomic_write_text
    from ..layers import release_memory_eagerly
    from ..subset import SubsetSpec

    release_memory_eagerly()  # a one-shot process: return each dropped layer to the OS at once
    specs = [SubsetSpec.load(path) for path in args.subset]
    report = evaluate(args.base, specs, args.examples, device=args.device, dtype=args.dtype,
                      max_tokens_per_example=args.max_tokens_per_example, progress=not args.quiet)
    for warning in report.warnings:
        logging.getLogger("emo_serve.eval").warning("%s", warning)
    if args.output:
        atomic_write_text(args.output, report.model_dump_json(indent=2) + "\n")
    print(report.table())
    return 0
