"""`emo-serve subset ...`: create, export and materialize subset manifests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SubsetError
from .common import positive_int


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
    except json.JSONDecodeError as exc:
        raise SubsetError(f"{path}: not valid JSON ({exc})") from None
    if not (isinstance(data, list) and all(isinstance(l, list) and all(type(i) is int for i in l) for l in data)):
        raise SubsetError(f"{path}: expected a JSON list of per-layer lists of integer expert ids")
    return data


def create(args: argparse.Namespace) -> int:
    from ..checkpoint import Checkpoint
    from ..subset import make_subset, random_subset, validate_name

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


def _open(args: argparse.Namespace):  # -> tuple[Checkpoint, SubsetSpec]
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
