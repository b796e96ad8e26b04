"""`python -m emo_serve.train OUT_DIR --variant emo|moe`: train and export one demo model."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .loop import TrainSettings, train, write_examples


def main() -> None:
    defaults = TrainSettings()
    p = argparse.ArgumentParser(prog="python -m emo_serve.train", description=__doc__)
    p.add_argument("out_dir", type=Path, help="checkpoint directory to create (must not exist), or with "
                   "--examples-only the directory receiving examples/ and heldout/")
    p.add_argument("--examples-only", action="store_true",
                   help="only write held-out example files per domain (no training)")
    p.add_argument("--variant", choices=["emo", "moe"], default=defaults.variant)
    p.add_argument("--work", type=Path, default=Path("build/train"), help="tokenizer + fp32 state")
    for name in ("steps", "batch", "seq_len", "seed", "threads", "min_pool", "small_pool_max"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "small_pool_prob", "balance_coef"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.examples_only:
        for path in write_examples(args.out_dir):
            print(path)
        return
    settings = TrainSettings(**{k: v for k, v in vars(args).items()
                                if k not in ("out_dir", "work", "examples_only")})
    args.work.mkdir(parents=True, exist_ok=True)
    record = train(settings, args.out_dir, args.work)
    print(json.dumps({k: record[k] for k in ("train_seconds", "heldout_loss")}))


if __name__ == "__main__":
    main()
