"""What the front end tells an engine to count a request under, and the `user` it accepts to
count: no engine here (the real-server counterpart is test_routing_counters_recreate.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from emo_serve.api.protocol import ChatCompletionRequest, CompletionRequest, FromTraffic
from emo_serve.api.proxy import engine_payload
from emo_serve.engines.placement import MODEL_ARG, USER_ARG
from emo_serve.usage import MAX_USER_CHARS, key_model, usage_key


def lease(model: str, salt: str | None) -> SimpleNamespace:
    return SimpleNamespace(model=model, served_name="engine-1", extra={}, salt=salt)


@pytest.mark.parametrize("model, salt, key", [
    ("code", "emo-subset-code-7", "code@emo-subset-code-7"),  # a subset on a shared engine: this life of it
    ("emo-demo", "emo-base", "emo-demo@emo-base"),
    ("code", None, "code"),                                    # its own dedicated engine
])
def test_the_engine_counts_a_request_under_its_models_incarnation(model: str, salt: str | None, key: str) -> None:
    body = engine_payload({"model": model, "prompt": "x", "user": "acme",
                           "vllm_xargs": {MODEL_ARG: "someone-else", USER_ARG: "another"}}, lease(model, salt))  # type: ignore[arg-type]
    assert body["vllm_xargs"][MODEL_ARG] == key == usage_key(model, salt) and key_model(key) == model
    assert body["vllm_xargs"][USER_ARG] == "acme"


@pytest.mark.parametrize("request_model", [CompletionRequest, ChatCompletionRequest])
def test_a_user_is_at_most_as_long_as_a_routing_query_accepts(request_model: type) -> None:
    fields = {"prompt": "x"} if request_model is CompletionRequest else {"messages": [{"role": "user"}]}
    assert request_model(model="m", user="u" * MAX_USER_CHARS, **fields).payload()["user"] == "u" * MAX_USER_CHARS
    with pytest.raises(ValidationError) as info:
        request_model(model="m", user="u" * (MAX_USER_CHARS + 1), **fields)
    assert info.value.errors()[0]["loc"] == ("user",)
    assert "user" not in request_model(model="m", **fields).payload()  # still passed on only when given
    FromTraffic(model="m", user="u" * MAX_USER_CHARS)
    with pytest.raises(ValidationError):
        FromTraffic(model="m", user="u" * (MAX_USER_CHARS + 1))
