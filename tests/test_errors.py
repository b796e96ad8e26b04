"""Typed errors: a message for people, and optionally the input field at fault for the API."""

from __future__ import annotations

import pytest

from emo_serve.errors import EmoServeError, ExamplesError, SubsetError


def test_param_names_the_field_and_defaults_to_none() -> None:
    assert EmoServeError("bad").param is None
    err = ExamplesError("examples[3]: empty example", param="examples")
    assert err.param == "examples" and str(err) == "examples[3]: empty example"
    with pytest.raises(SubsetError) as caught:
        raise SubsetError("size 9: layer 0 has 8 routed experts", param="size")
    assert caught.value.param == "size" and isinstance(caught.value, EmoServeError)
