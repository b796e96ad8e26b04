"""Loading, validating and tokenizing profiling examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.errors import ExamplesError
from emo_serve.examples import MAX_EXAMPLE_CHARS, MAX_EXAMPLES, load_examples, load_tokenizer, tokenize_examples

CHAT = [{"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."}]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_jsonl_text_and_messages(tmp_path):
    f = write(tmp_path / "ex.jsonl", json.dumps({"text": "one"}) + "\n\n" + json.dumps({"messages": CHAT}) + "\n")
    ex = load_examples(f)
    assert [e.text for e in ex] == ["one", None]
    assert list(ex[1].messages) == CHAT
    assert ex[1].where == f"{f}:3"


def test_txt_blank_line_separated(tmp_path):
    f = write(tmp_path / "ex.txt", "first line\nstill first\n\n  \n\nsecond\n\n\n")
    assert [e.text for e in load_examples(f)] == ["first line\nstill first", "second"]


def test_json_list_and_python_list(tmp_path):
    f = write(tmp_path / "ex.json", json.dumps(["a", {"text": "b"}, {"messages": CHAT}]))
    assert [e.text for e in load_examples(f)] == ["a", "b", None]
    assert [e.text for e in load_examples(["a", {"text": "b"}])] == ["a", "b"]


def test_openai_text_content_parts():
    ex = load_examples([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "},
                                                                    {"type": "text", "text": "there"}]}]}])
    assert ex[0].messages[0]["content"] == "hi there"


def test_fingerprints_depend_on_content_only():
    a, b, c = load_examples(["same", "same", "other"])
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint.startswith("sha256:")


@pytest.mark.parametrize("source, message", [
    ([], "no examples"),
    ([""], "examples[0]: empty example"),
    (["ok", "   \n "], "examples[1]: empty example"),
    ([{"text": ""}], "examples[0].text: empty example"),
    ([42], "expected a string or an object"),
    ([{"text": 3}], "examples[0].text: expected a string, got int"),
    ([{"prompt": "x"}], "needs exactly one of 'text' or 'messages'"),
    ([{"text": "x", "messages": CHAT}], "needs exactly one of"),
    ([{"messages": []}], "expected a non-empty list of messages"),
    ([{"messages": [{"content": "x"}]}], "examples[0].messages[0]: expected an object with a 'role'"),
    ([{"messages": [{"role": "user", "content": ""}]}], "examples[0].messages[0].content: empty example"),
    ([{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}], "only text content parts"),
    (["x" * (MAX_EXAMPLE_CHARS + 1)], "characters, at most"),
    (["x"] * (MAX_EXAMPLES + 1), f"at most {MAX_EXAMPLES} are allowed"),
    (42, "expected a file path or a list"),
])
def test_bad_examples(source, message):
    with pytest.raises(ExamplesError) as err:
        load_examples(source)
    assert message in str(err.value)


def test_limits_are_the_callers(tmp_path) -> None:
    """The server passes EMO_MAX_EXAMPLES / EMO_MAX_EXAMPLE_CHARS: raising them raises the caps."""
    many, long = ["x"] * (MAX_EXAMPLES + 1), "x" * (MAX_EXAMPLE_CHARS + 1)
    assert len(load_examples(many, max_examples=MAX_EXAMPLES + 1)) == MAX_EXAMPLES + 1
    assert load_examples([long], max_chars=MAX_EXAMPLE_CHARS + 1)[0].text == long
    with pytest.raises(ExamplesError, match="at most 2 are allowed"):
        load_examples(["a", "b", "c"], max_examples=2)
    with pytest.raises(ExamplesError, match="5 characters, at most 4 are allowed"):
        load_examples(["12345"], max_chars=4)
    chat = [{"messages": [{"role": "user", "content": "123"}, {"role": "assistant", "content": "45"}]}]
    with pytest.raises(ExamplesError, match="more than 4 characters in all"):
        load_examples(chat, max_chars=4)
    path = tmp_path / "three.txt"
    path.write_text("a\n\nb\n\nc\n")
    with pytest.raises(ExamplesError, match="3 examples, at most 2 are allowed"):
        load_examples(path, max_examples=2)


@pytest.mark.parametrize("name, text, message", [
    ("empty.txt", "\n\n  \n", "no examples"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
    ("obj.json", '{"text": "ok"}', "expected a JSON list"),
    ("empty.jsonl", '{"text": "ok"}\n{"text": "  "}\n', "empty.jsonl:2.text: empty example"),
])
def test_bad_files(tmp_path, name, text, message):
    with pytest.raises(ExamplesError) as err:
        load_examples(write(tmp_path / name, text))
    assert message in str(err.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ExamplesError, match="examples file not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ExamplesError, match="not UTF-8"):
        load_examples(tmp_path / "bin.txt")


def test_chat_rendering_matches_transformers(tiny_ckpt):
    """The tokens are exactly those of transformers' `apply_chat_template` on the same files."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tiny_ckpt))
    ckpt = Checkpoint(tiny_ckpt)
    (chat, text), warnings = tokenize_examples(ckpt, load_examples([{"messages": CHAT}, "def f(x): return x"]), 512)
    assert not warnings
    assert chat.tolist() == list(hf.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    assert text.tolist() == hf("def f(x): return x")["input_ids"]
    rendered = load_tokenizer(ckpt).render(load_examples([{"messages": CHAT}])[0])
    assert rendered.startswith("<|im_start|>system\nYou add numbers.<|im_end|>\n")
    assert chat.tolist().count(hf.convert_tokens_to_ids("<|im_start|>")) == 3  # special, not spelled out


def test_truncation_to_max_tokens_and_to_context_is_reported(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    long = " ".join(str(i) for i in range(3000))  # > 2048 tokens, the tiny model's context
    (short, capped), warnings = tokenize_examples(ckpt, load_examples(["1 + 1 = 2", long]), 16)
    assert len(short) < 16 and len(capped) == 16
    assert len(warnings) == 1 and "examples[1]" in warnings[0] and "truncated to 16" in warnings[0]
    (capped,), warnings = tokenize_examples(ckpt, load_examples([long]), 100_000)
    assert len(capped) == ckpt.config.max_position_embeddings == 2048
    assert "the model's context" in warnings[0]


def test_chat_without_template_is_an_error(tiny_ckpt, tmp_path):
    import shutil

    copy = Path(shutil.copytree(tiny_ckpt, tmp_path / "notemplate"))
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExamplesError, match="has no chat_template"):
        tokenize_examples(Checkpoint(copy), load_examples([{"messages": CHAT}]), 64)
    # Newer exports keep the template in its own file; that works too.
    (copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    (ids,), _ = tokenize_examples(Checkpoint(copy), load_examples([{"messages": CHAT}]), 64)
    assert len(ids) > 0
