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


def test_library_errors_name_the_request_field(tiny_ckpt) -> None:
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.examples import load_examples
    from emo_serve.selection import SelectionRequest

    cfg = Checkpoint(tiny_ckpt).config
    with pytest.raises(ExamplesError) as caught:
        load_examples([""])
    assert caught.value.param == "examples"
    cases = [(SelectionRequest(size=99), "size"), (SelectionRequest(fraction=2.0), "fraction"),
             (SelectionRequest(sizes=(1, 2)), "sizes"), (SelectionRequest(budget=1000), "budget"),
             (SelectionRequest(max_loss_increase=-1.0), "max_loss_increase"),
             (SelectionRequest(method="random", budget=10), "method"),
             (SelectionRequest(method="layerwise", sizes=(2, 2, 2, 2)), "method")]
    for request, field in cases:
        with pytest.raises(EmoServeError) as caught:
            request.check(cfg)
        assert caught.value.param == field, (request, caught.value)
