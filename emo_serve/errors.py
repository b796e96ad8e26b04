"""Typed errors. Each names what is wrong and where (file, tensor, layer), so the CLI can print
it and exit 2 and the HTTP API can turn it into an OpenAI-shaped 400/404/409 error."""

from __future__ import annotations


class EmoServeError(Exception):
    """Base class of every error emo-serve raises; its kind (the subclasses below) is all the
    HTTP API needs to choose a status (`api/errors.py` maps kinds to statuses in one table).

    `param` names the input at fault where there is one (a request field such as `examples` or
    `model`), for the error body's `param`; `code` is the body's machine-readable `code`.
    """

    code: str | None = None
    default_param: str | None = None

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param if param is not None else self.default_param


# -- the kinds: what went wrong, from the caller's side -------------------------------------------
class InvalidInput(EmoServeError):
    """The input (a file, a manifest, a request field, a setting) is wrong (CLI: exit 2; HTTP: 400)."""


class NotFound(EmoServeError):
    """What the request names does not exist (404)."""


class Conflict(EmoServeError):
    """The request contradicts the current state: a name taken, a model busy (409)."""


class Busy(EmoServeError):
    """Every slot that could serve the request is in use; retry later (429)."""


class Unavailable(EmoServeError):
    """What would serve the request is down or not ready yet (503)."""


class TimedOut(Unavailable):
    """What serves the request did not answer in time (504)."""


# -- bad input, by where it was found -----------------------------------------------------------
class CheckpointError(InvalidInput):
    """A checkpoint (config, index, shard header or tensor) is missing or malformed."""


class ConfigError(CheckpointError):
    """`config.json` does not describe a valid EMO model."""


class SubsetError(InvalidInput):
    """A subset spec or manifest is invalid, or does not match its base checkpoint."""


class ExamplesError(InvalidInput):
    """Profiling or evaluation examples are missing or malformed (the field at fault: `examples`)."""

    default_param = "examples"


class SettingsError(InvalidInput):
    """The server's settings (flags, `EMO_*` variables) are invalid or unsafe."""
