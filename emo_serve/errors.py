"""Typed errors. Each names what is wrong and where (file, tensor, layer), so the CLI can print
it and exit 2 and the HTTP API can turn it into an OpenAI-shaped 400/404/409 error."""

from __future__ import annotations


class EmoServeError(Exception):
    """Base class of every error emo-serve raises on bad input.

    `param` names the input at fault where there is one (a request field such as `examples` or
    `size`), so the HTTP API can report it in the error body's `param`.
    """

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


class CheckpointError(EmoServeError):
    """A checkpoint (config, index, shard header or tensor) is missing or malformed."""


class ConfigError(CheckpointError):
    """`config.json` does not describe a valid EMO model."""


class SubsetError(EmoServeError):
    """A subset spec or manifest is invalid, or does not match its base checkpoint."""


class ExamplesError(EmoServeError):
    """Profiling or evaluation examples are missing or malformed (the field at fault: `examples`)."""

    def __init__(self, *args: object, param: str | None = "examples") -> None:
        super().__init__(*args, param=param)


class SettingsError(EmoServeError):
    """The server's settings (flags, `EMO_*` variables) are invalid or unsafe."""
