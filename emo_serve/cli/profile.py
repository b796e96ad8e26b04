"""`emo-serve profile`: rank experts on a few task examples and write a subset manifest."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EmoServeError
from ..methods import METHODS
from .common import fraction, positive_int

if TYPE_CHECKING:
    from ..selection import SelectionRequest

log = logging.getLogger("emo_serve.profile")


class ProfileUsageError(EmoServeError):
    """Options of `emo-serve profile` that do not go together."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="pick an expert subset from a few task examples",
        description="Run the base model one layer at a time on task examples, score every expert "
        "of every layer, and keep the top K routed experts per layer plus the shared ones.")
    p.add_argument("--base", required=True, help="base checkpoint: directory, fsspec URL or Hub id")
    p.add_argument("--examples", required=True, type=Path,
                   help="JSONL ({'text'} or {'messages'} per line), a JSON list, or text with "
                   "examples separated by blank lines; 1 to 64 examples")
    add_size_arguments(p.add_mutually_exclusive_group(required=True))
    p.add_argument("--method", choices=METHODS, default="usage",
                   help="scoring method (default: usage; layerwise is greedy over layers)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (default: float32)")
    p.add_argument("--max-tokens-per-example", type=positive_int, default=512, metavar="N",
                   help="truncate longer examples (recorded as a warning in the output; default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("--folds", type=positive_int, default=5,
                   help="cross-validation folds of --max-loss-increase/--budget (default 5; 1 = in-sample)")
    p.add_argument("--name", help="subset name (default: <examples file stem>-<method>)")
    p.add_argument("-o", "--output", required=True, type=Path, help="subset manifest to write")
    p.add_argument("--scores", type=Path, help="also write the full score table (JSON)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw a layers x experts heatmap")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_size_arguments(group: argparse._MutuallyExclusiveGroup) -> None:
    """How big the subset is: a given count, or one chosen by measured quality (`selection`)."""
    group.add_argument("--size", type=positive_int, metavar="K", help="routed experts kept per layer")
    group.add_argument("--fraction", type=fraction, metavar="F",
                       help="share of each layer's routed experts kept, in (0, 1]")
    group.add_argument("--max-loss-increase", type=non_negative_float, metavar="R",
                       help="smallest size whose perplexity rises by at most R (0.05 = +5%%), "
                       "estimated by k-fold over the examples (in-sample with one example)")
    group.add_argument("--budget", type=positive_int, metavar="N",
                       help="N routed experts summed over layers, allocated greedily by marginal loss")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def default_name(examples: Path, method: str) -> str:
    from ..names import validate_name

    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in examples.stem).strip("-.") or "subset"
    return validate_name(f"{stem[:48]}-{method}")


def selection_request(args: argparse.Namespace) -> SelectionRequest:
    from ..selection import SelectionRequest

    return SelectionRequest(method=args.method, size=args.size, fraction=args.fraction,
                            max_loss_increase=args.max_loss_increase, budget=args.budget, folds=args.folds,
                            device=args.device, dtype=args.dtype,
                            max_tokens_per_example=args.max_tokens_per_example, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import Checkpoint
    from ..examples import load_examples
    from ..layers import release_memory_eagerly
    from ..names import validate_name
    from ..selection import build_subset

    name = validate_name(args.name) if args.name else default_name(args.examples, args.method)
    request = selection_request(args)
    if request.by_quality and (args.scores or args.plot):
        raise ProfileUsageError("--scores/--plot are not available with --max-loss-increase/--budget")
    examples = load_examples(args.examples)
    ckpt = Checkpoint(args.base)
    request.check(ckpt.config)  # before the (possibly long) forward pass, not after it
    release_memory_eagerly()  # a one-shot process: return each dropped layer to the OS at once
    selected = build_subset(ckpt, examples, request, name=name, progress=not args.quiet)
    spec, scores = selected.spec, selected.scores
    if scores is not None:
        for warning in scores.warnings:
            log.warning("%s", warning)
        if args.scores:
            scores.save(args.scores)
        if args.plot:
            from ..plot import plot_profile

            plot_profile(args.plot, scores=scores, spec=spec)
    else:
        quality = spec.provenance.details["quality"]
        log.info("sizes %s: perplexity %+.1f%%, next-token accuracy %+.1f points (%s, %d examples)",
                 quality["sizes"], 100 * quality["relative_change"], quality["accuracy_change"],
                 quality["estimate"], quality["examples"])
    spec.save(args.output)
    print(args.output)
    return 0
