"""`emo-serve doctor`: check, on this machine, that one shared vLLM engine serves subsets exactly
as dedicated engines do (masked routing, routing capture, expert slots, prefix-cache isolation).

Exit status: 0 every check passed, 1 a check failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .common import positive_int

log = logging.getLogger("emo_serve.doctor")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check that a shared engine serves subsets exactly as dedicated engines do, here",
        description="Start the demo model in one shared vLLM engine (mask rows, expert slots, routing "
        "capture, prefix caching) and in a dedicated engine per subset, one engine at a time, and check "
        "that masked routing, capture counts, expert slots and prefix-cache isolation are exact. Prints "
        "the platform, vLLM version, model runner, CUDA graphs and CPU flags, then one row per check. "
        "Exit status 0: all passed; 1: a check failed; 2: bad usage. A few minutes on a 2-core CPU.")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="the engines' dtype (auto: float32 on CPU, so that equal means equal to rounding; "
                   "the model's own dtype on GPUs, compared with a looser tolerance)")
    p.add_argument("--tolerance", type=float, metavar="NATS",
                   help="largest logprob difference that counts as equal (default: 1e-3 for float32, 0.1 "
                   "for 16-bit dtypes)")
    p.add_argument("--work-dir", type=Path, metavar="DIR",
                   help="keep manifests, engine logs and answers here (default: a temporary dir, removed); "
                   "a later run reuses the dedicated engines' answers when nothing they depend on changed")
    p.add_argument("--timeout", type=positive_int, default=600, metavar="S", help="seconds each engine may take")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..doctor import Options, run_doctor
    from ..doctor.plan import FAULT_ENV, parse_faults
    from ..doctor.report import render, render_logs

    options = Options(dtype=args.dtype, tolerance=args.tolerance, work_dir=args.work_dir,
                      timeout_s=float(args.timeout), faults=parse_faults(os.environ.get(FAULT_ENV)))
    report = run_doctor(options, lambda line: log.info("%s", line))
    if report.logs:
        print(render_logs(report), file=sys.stderr)
    print(render(report))
    return 0 if report.ok else 1
