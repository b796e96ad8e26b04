"""`emo-serve serve`: the HTTP server (OpenAI-compatible API + subsets API) on uvicorn.

Every flag is also an `EMO_*` environment variable (flag > env > default), parsed by one
`Settings` object. The flags are generated from `Settings`' fields (name, description, default),
so the help, the flags and the environment variables cannot drift apart; the flags only collect
what was given on the command line and `Settings` validates it.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from ..errors import SettingsError

S = argparse.SUPPRESS  # a flag not given leaves the env/default value in place
# Repeatable list settings take one value per flag, under a singular name.
REPEATED_FLAGS = {"preload_subsets": ("--preload-subset", "FILE"), "engine_args": ("--engine-arg", "ARG")}


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
    """One flag per `Settings` field (importing pydantic-settings only: no torch, no server)."""
    from ..settings import Settings

    groups: dict[str, Any] = {}
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        group_name = extra.get("group")
        target = p if group_name is None else groups.setdefault(str(group_name), p.add_argument_group(str(group_name)))
        flag, metavar = REPEATED_FLAGS.get(name, ("--" + name.replace("_", "-"), None))
        help_text = f"{field.description} ({prefix}{name.upper()}{_default(field)})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": S, "help": help_text}
        choices = _choices(field.annotation)
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in REPEATED_FLAGS:
            kwargs.update(action="append", metavar=metavar)
        elif choices:
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        target.add_argument(flag, **kwargs)


def _default(field: Any) -> str:
    """`, default X` for a plain default; factories and None say theirs in the description."""
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None or field.default in (None, PydanticUndefined):
        return ""
    value = str(field.default).lower() if isinstance(field.default, bool) else field.default
    return f", default {value}"


def _choices(annotation: Any) -> tuple[str, ...]:
    """The values of a `Literal[...]` annotation (validated, case-insensitively, by `Settings`)."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return ()


def settings_from_args(args: argparse.Namespace) -> Any:
    """`Settings` from the environment, overridden by the flags that were given (raises
    pydantic's ValidationError as `Settings` does)."""
    from ..settings import Settings

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose")}
    return Settings(**given)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
    return serve(settings)


def _describe(error: Any) -> str:
    """A settings error named by its flag and its environment variable."""
    msg = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return msg
    field = str(error["loc"][0])
    flag = REPEATED_FLAGS.get(field, ("--" + field.replace("_", "-"), None))[0]
    return f"{flag} / EMO_{field.upper()}: {msg}"


# Longer than clients keep idle connections (httpx and so the `openai` client: 5 s, uvicorn's own
# default) and than load balancers' idle timeouts (60 s on AWS's): with equal timeouts a client
# reuses a connection just as the server closes it, and its request is lost without an answer
# (a ReadError, found by bench/soak.py). nginx's default, as vLLM's engine gets from the front end.
KEEP_ALIVE_SECONDS = 75


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
                            timeout_keep_alive=KEEP_ALIVE_SECONDS,
                            h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_graceful_shutdown=int(settings.drain_timeout) or None,
                            server_header=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
