"""`emo-serve subset ...`: create, export, materialize, plot and combine subset manifests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SubsetError
from .common import positive_int

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..subset import SubsetSpec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("subset", help="create, export and materialize expert subsets")
    cmds = p.add_subparsers(dest="subset_command", required=True, metavar="SUBCOMMAND")

    c = cmds.add_parser("create", help="write a subset manifest from explicit or random expert ids")
    c.add_argument("--base", required=True, help="base checkpoint: directory, fsspec URL or Hub id")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--experts", help="comma-separated original expert ids kept at every layer")
    how.add_argument("--experts-file", type=Path, help="JSON list of per-layer lists of expert ids")
    how.add_argument("--random", type=positive_int, metavar="K", help="K random routed experts per layer")
    c.add_argument("--seed", type=int, default=0, help="seed for --random")
    c.add_argument("--name", required=True, help="subset name (also its model id)")
    c.add_argument("-o", "--output", required=True, type=Path, help="manifest file to write")
    c.set_defaults(func=create)

    e = cmds.add_parser("export", help="write a standalone checkpoint holding only the subset")
    e.add_argument("manifest", type=Path)
    e.add_argument("out_dir", type=Path)
    e.add_argument("--base", help="read the base from here instead of the manifest's location")
    e.set_defaults(func=export)

    m = cmds.add_parser("materialize", help="write a weightless manifest directory vLLM can serve")
    m.add_argument("manifest", type=Path)
    m.add_argument("out_dir", type=Path)
    m.add_argument("--base", help="read the base from here instead of the manifest's location")
    m.set_defaults(func=materialize)

    pl = cmds.add_parser("plot", help="draw a layers x experts heatmap of a subset or a scores file")
    pl.add_argument("input", type=Path, help="subset manifest or scores file (from profile --scores)")
    pl.add_argument("png", type=Path, metavar="FILE.png")
    pl.add_argument("--scores", type=Path, help="with a manifest: colour by these scores")
    pl.add_argument("--size", type=positive_int, metavar="K", help="with a scores file: mark its top K")
    pl.add_argument("--base", help="with a manifest alone: read the layer shapes from here "
                    "instead of the manifest's base location")
    pl.set_defaults(func=plot)

    u = cmds.add_parser("union", help="combine subsets of one base: per layer, the union of kept experts")
    u.add_argument("manifests", type=Path, nargs="+", metavar="SUBSET.json")
    u.add_argument("--name", required=True, help="name of the combined subset")
    u.add_argument("-o", "--output", required=True, type=Path, help="manifest file to write")
    u.set_defaults(func=union)


def parse_expert_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SubsetError(f"--experts {text!r}: expected comma-separated integers") from None


def read_experts_file(path: Path) -> list[list[int]]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise SubsetError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SubsetError(f"{path}: not valid JSON ({exc})") from None
    if not (isinstance(data, list) and all(isinstance(ids, list) and all(type(i) is int for i in ids) for ids in data)):
        raise SubsetError(f"{path}: expected a JSON list of per-layer lists of integer expert ids")
    return data


def create(args: argparse.Namespace) -> int:
    from ..checkpoint import Checkpoint
    from ..names import validate_name
    from ..subset import make_subset, random_subset

    validate_name(args.name)
    ckpt = Checkpoint(args.base)
    if args.random is not None:
        spec = random_subset(ckpt, args.random, args.name, seed=args.seed)
    else:
        n = ckpt.config.num_hidden_layers
        routed = read_experts_file(args.experts_file) if args.experts_file else [parse_expert_ids(args.experts)] * n
        spec = make_subset(ckpt, routed, args.name)
    spec.save(args.output)
    print(args.output)
    return 0


def _open(args: argparse.Namespace) -> tuple[Checkpoint, SubsetSpec]:
    from ..checkpoint import Checkpoint
    from ..subset import SubsetSpec

    spec = SubsetSpec.load(args.manifest)
    ckpt = Checkpoint(args.base or spec.base.location)
    if args.base:  # the written files must point at the base that was actually checked
        spec.base.location = ckpt.location
    return ckpt, spec


def export(args: argparse.Namespace) -> int:
    from ..export import export_subset

    ckpt, spec = _open(args)
    print(export_subset(ckpt, spec, args.out_dir))
    return 0


def materialize(args: argparse.Namespace) -> int:
    from ..export import materialize_subset

    ckpt, spec = _open(args)
    print(materialize_subset(ckpt, spec, args.out_dir))
    return 0


def _is_scores_file(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == "emo-scores/v1"
    except (OSError, ValueError, AttributeError):
        return False  # let the manifest loader report what is wrong with it


def plot(args: argparse.Namespace) -> int:
    from ..plot import plot_profile
    from ..profiler import Scores
    from ..subset import SubsetSpec

    scores: Scores | None
    if _is_scores_file(args.input):
        if args.scores:
            raise SubsetError(f"{args.input} is a scores file; --scores goes with a subset manifest")
        scores = Scores.load(args.input)
        kept = scores.top(scores.resolve_sizes(args.size)) if args.size else scores.kept
        plot_profile(args.png, scores=scores, kept=kept)
    else:
        if args.size:
            raise SubsetError("--size goes with a scores file; a manifest already says what is kept")
        spec = SubsetSpec.load(args.input)
        scores = Scores.load(args.scores) if args.scores else None
        if scores is not None and scores.base.fingerprint != spec.base.fingerprint:
            raise SubsetError(f"{args.scores} and {args.input} were made for different base checkpoints")
        config = None
        if scores is None:
            from ..checkpoint import Checkpoint

            ckpt = Checkpoint(args.base or spec.base.location)
            spec.check_against(ckpt)
            config = ckpt.config
        plot_profile(args.png, scores=scores, spec=spec, config=config)
    print(args.png)
    return 0


def union(args: argparse.Namespace) -> int:
    from ..subset import SubsetSpec, union_specs

    spec = union_specs([SubsetSpec.load(p) for p in args.manifests], args.name)
    spec.save(args.output)
    print(args.output)
    return 0
