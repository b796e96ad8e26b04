"""`emo-serve demo-model`: generate an EMO checkpoint with the released schema."""

from __future__ import annotations

import argparse

from .common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-model", help="write a demo EMO checkpoint (random weights, real schema)",
                       description="Write a sharded EMO checkpoint with seeded random weights, the "
                       "config schema and tensor names of allenai/Emo_1b14b_1T, and a tokenizer "
                       "trained offline. Flags override the preset.")
    p.add_argument("out_dir", help="directory to create (must not exist)")
    p.add_argument("--preset", choices=["tiny", "emo-1b14b"], default="tiny")
    p.add_argument("--layers", type=positive_int, dest="num_hidden_layers")
    p.add_argument("--experts", type=positive_int, dest="num_experts")
    p.add_argument("--shared", type=int, dest="num_shared_experts")
    p.add_argument("--top-k", type=positive_int, dest="num_experts_per_tok")
    p.add_argument("--hidden", type=positive_int, dest="hidden_size")
    p.add_argument("--intermediate", type=positive_int, dest="intermediate_size")
    p.add_argument("--heads", type=positive_int, dest="num_attention_heads")
    p.add_argument("--vocab", type=positive_int, dest="vocab_size")
    p.add_argument("--shards", type=positive_int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], dest="torch_dtype")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import write_demo_checkpoint

    overrides = {k: getattr(args, k) for k in (
        "num_hidden_layers", "num_experts", "num_shared_experts", "num_experts_per_tok", "hidden_size",
        "intermediate_size", "num_attention_heads", "vocab_size", "torch_dtype")}
    out = write_demo_checkpoint(args.out_dir, args.preset, shards=args.shards, seed=args.seed, **overrides)
    print(out)
    return 0
