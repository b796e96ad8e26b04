"""A stand-in for vLLM's OpenAI server in the supervisor's unit tests: it takes the same
`--model/--uds` arguments, answers `/health` on the Unix socket and stays up until signalled.
FAKE_ENGINE=exit makes it exit with status 3 before it is healthy (a failed start).

The supervisor's own tests need engines that start in a second and fail on demand; the real
engine is covered by the tests in tests/api/ and tests/plugin/.
"""

from __future__ import annotations

import argparse
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

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    web.run_app(app, path=args.uds, print=None)


if __name__ == "__main__":
    main()
