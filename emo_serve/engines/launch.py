"""Child-side launcher of a vLLM engine: ties the engine's life to the front end's, then becomes
vLLM's OpenAI server (exec, same pid).

The front end stops its engines on shutdown, but if it is killed outright (SIGKILL, OOM killer) no
code of it runs; the kernel's parent-death signal (Linux) then sends SIGTERM to the engine, and
vLLM's server shuts down its own engine-core processes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def main() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        expected = os.environ.get("EMO_PARENT_PID")
        if expected and os.getppid() != int(expected):  # the parent died before prctl took effect
            sys.exit(1)
    os.execv(sys.executable, [sys.executable, "-m", VLLM_SERVER_MODULE, *sys.argv[1:]])


if __name__ == "__main__":
    main()
