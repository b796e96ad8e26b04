"""`emo-serve serve`: the HTTP server (OpenAI-compatible API + subsets API) on uvicorn.

Every flag is also an `EMO_*` environment variable (flag > env > default), parsed by one
`Settings` object; the flags here only collect what was given on the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import positive_int

S = argparse.SUPPRESS  # a flag not given leaves the env/default value in place


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the HTTP server (OpenAI API + subsets API) on vLLM engines",
        description="Serve an EMO base checkpoint and its expert subsets behind OpenAI-compatible "
        "endpoints. With no --model, serves the embedded demo model. Every option is also an "
        "EMO_* environment variable (e.g. --max-engines / EMO_MAX_ENGINES); flags win.",
        argument_default=S)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base checkpoint: directory, fsspec URL or HF id (EMO_MODEL)")
    p.add_argument("--served-model-name", help="model id of the base in the API (EMO_SERVED_MODEL_NAME)")
    p.add_argument("--host", help="bind address (EMO_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (EMO_PORT, default 8000)")
    p.add_argument("--state-dir", type=Path, help="subsets, demo model, engine logs (EMO_STATE_DIR, "
                   "default $XDG_DATA_HOME/emo-serve)")
    p.add_argument("--api-key", help="bearer key for /v1/* (EMO_API_KEY)")
    p.add_argument("--admin-key", help="bearer key for subset changes; defaults to the API key (EMO_ADMIN_KEY)")
    p.add_argument("--allow-insecure-admin", action="store_true",
                   help="allow a non-loopback bind with no admin key (EMO_ALLOW_INSECURE_ADMIN)")
    p.add_argument("--engine-mode", choices=["auto", "shared", "dedicated"],
                   help=f"{_field_help('engine_mode')} (EMO_ENGINE_MODE, default auto)")
    p.add_argument("--subset-slots", type=positive_int, help="mask rows of a shared engine, row 0 being the "
                   "unmasked base (EMO_SUBSET_SLOTS, default 64)")
    p.add_argument("--max-engines", type=positive_int, help="resident vLLM engines, LRU-evicted (EMO_MAX_ENGINES, default 2)")
    p.add_argument("--kv-cache-gb", type=float, help="KV cache per engine in GiB (EMO_KV_CACHE_GB, default 1)")
    p.add_argument("--serve-base", action=argparse.BooleanOptionalAction,
                   help="also serve the full base model (EMO_SERVE_BASE, default true)")
    p.add_argument("--preload-subset", action="append", dest="preload_subsets", type=Path, metavar="FILE",
                   help="subset manifest registered and loaded at start; repeatable "
                   "(EMO_PRELOAD_SUBSETS, comma-separated)")
    p.add_argument("--tensor-parallel-size", type=positive_int, help="passed to each engine (EMO_TENSOR_PARALLEL_SIZE)")
    p.add_argument("--max-model-len", type=positive_int, help="context length passed to vLLM (EMO_MAX_MODEL_LEN)")
    p.add_argument("--dtype", help="engine dtype: auto, float32, bfloat16, float16 (EMO_DTYPE)")
    p.add_argument("--device", help="profiling device: auto, cpu, cuda (EMO_DEVICE)")
    p.add_argument("--engine-start-timeout", type=float, help="seconds an engine may take to become healthy "
                   "(EMO_ENGINE_START_TIMEOUT, default 600)")
    p.add_argument("--log-level", help="critical, error, warning, info, debug (EMO_LOG_LEVEL)")
    extra = p.add_argument_group("limits and tuning")
    extra.add_argument("--engine-arg", action="append", dest="engine_args", metavar="ARG",
                       help="extra vLLM server argument, repeatable (EMO_ENGINE_ARGS, shell-quoted string)")
    extra.add_argument("--load-wait-timeout", type=float, help="seconds a request waits for its model "
                       "to load; 0 = the engine start timeout (EMO_LOAD_WAIT_TIMEOUT)")
    extra.add_argument("--drain-timeout", type=float, help="seconds shutdown waits for requests in "
                       "flight (EMO_DRAIN_TIMEOUT, default 30)")
    extra.add_argument("--max-body-bytes", type=positive_int, help="request body limit (EMO_MAX_BODY_BYTES)")
    extra.add_argument("--max-header-bytes", type=positive_int, help="request header limit (EMO_MAX_HEADER_BYTES)")
    extra.add_argument("--max-n", type=positive_int, help="largest `n` per request (EMO_MAX_N, default 16)")
    extra.add_argument("--max-examples", type=positive_int, help="profiling examples per subset (EMO_MAX_EXAMPLES)")
    extra.add_argument("--max-example-chars", type=positive_int, help="characters per example (EMO_MAX_EXAMPLE_CHARS)")
    for name in ("probe_interval", "probe_timeout", "upstream_read_timeout", "upstream_idle_timeout",
                 "client_send_timeout"):
        extra.add_argument(f"--{name.replace('_', '-')}", type=float,
                           help=f"{_field_help(name)} (EMO_{name.upper()})")
    extra.add_argument("--probe-misses", type=positive_int, help=f"{_field_help('probe_misses')} (EMO_PROBE_MISSES)")
    extra.add_argument("--allowed-hosts", type=lambda v: [h.strip() for h in v.split(",") if h.strip()],
                       help=f"{_field_help('allowed_hosts')} (EMO_ALLOWED_HOSTS)")


def _field_help(name: str) -> str:
    from ..settings import Settings

    return Settings.model_fields[name].description or name


def settings_from_args(args: argparse.Namespace) -> Any:
    """`Settings` from the environment, overridden by the flags that were given."""
    from ..settings import Settings

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose")}
    return Settings(**given)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise ValueError("; ".join(_describe(e) for e in exc.errors())) from None
    return serve(settings)


def _describe(error: Any) -> str:
    """A settings error named by its flag and its environment variable."""
    msg = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return msg
    field = str(error["loc"][0])
    return f"--{field.replace('_', '-')} / EMO_{field.upper()}: {msg}"


def serve(settings: Any) -> int:
    """Run the server until SIGINT/SIGTERM; the library entry point behind the command."""
    import atexit

    import uvicorn

    from ..api import create_app
    from ..logs import configure_logging

    configure_logging(settings.log_level)
    app = create_app(settings)
    service = app.state.service
    service.prepare()  # bad configuration fails here: exit status 2 with a message
    atexit.register(service.kill_engines)  # last resort if the lifespan shutdown never ran
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level, access_log=False, http="h11",
                            h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_graceful_shutdown=int(settings.drain_timeout) or None,
                            server_header=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
