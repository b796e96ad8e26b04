"""Names that become file names and model ids: one pattern for subset names and the base's id.

A name is a file name in the state dir and a model id in the API, so it may not hold a path, a
dot-dot or a trailing newline (`\\Z`, with `fullmatch`: `$` would accept "name\\n"). Torch-free,
so the HTTP protocol models and settings can use it without loading the model stack.
"""

from __future__ import annotations

import re

from .errors import SubsetError

NAME_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
NAME_RULES = "1-64 letters, digits, '_', '-', '.', starting with a letter or digit, without '..'"


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def validate_name(name: str) -> str:
    """`name` unchanged, or SubsetError saying what a name may be."""
    if not is_valid_name(name):
        raise SubsetError(f"invalid subset name {name!r}: use {NAME_RULES}")
    return name
