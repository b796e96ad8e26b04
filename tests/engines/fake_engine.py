"""A stand-in for vLLM's OpenAI server in the supervisor's unit tests: it takes the same
`--model/--uds` arguments, maps a file in /dev/shm as vLLM's message queues do, answers `/health`
on the Unix socket and stays up until signalled. FAKE_ENGINE=exit makes it exit with status 3
before it is healthy (a failed start).

The supervisor's own tests need engines that start in a second and fail on demand; the real
engine is covered by the tests in tests/api/ and tests/plugin/.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uds", required=True)
    args, _ = parser.parse_known_args()
    if os.environ.get("FAKE_ENGINE") == "exit":
        print("fake engine: refusing to start", file=sys.stderr)
        sys.exit(3)

    with open(f"/dev/shm/psm_fake_{os.getpid()}", "w+b") as shm:
        shm.truncate(4096)
        segment = mmap.mmap(shm.fileno(), 4096)
    segment[:4] = b"emo!"

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    web.run_app(app, path=args.uds, print=None)


if __name__ == "__main__":
    main()
