"""Typed errors. Each names what is wrong and where (file, tensor, layer), so the CLI can print
it and exit 2 and the HTTP API can turn it into an OpenAI-shaped 400/404/409 error."""

from __future__ import annotations


class EmoServeError(Exception):
    """Base class of every error emo-serve raises on bad input."""


class CheckpointError(EmoServeError):
    """A checkpoint (config, index, shard header or tensor) is missing or malformed."""


class ConfigError(CheckpointError):
    """`config.json` does not describe a valid EMO model."""


class SubsetError(EmoServeError):
    """A subset spec or manifest is invalid, or does not match its base checkpoint."""


class ExamplesError(EmoServeError):
    """Profiling or evaluation examples are missing or malformed."""
