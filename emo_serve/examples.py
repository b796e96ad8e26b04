"""Task examples for profiling and evaluation: loading, validation and tokenization.

An example is plain text or an OpenAI-style chat (`messages`), rendered with the checkpoint's own
chat template so the profiler sees the tokens the served model will see. Sources: a JSONL file
(one `{"text": ...}` or `{"messages": [...]}` per line), a `.json` file holding a list of those,
any other text file (examples separated by blank lines), or a Python list of strings/dicts (the
HTTP API). Tokenizer files are read through `Checkpoint.read_file`, so remote bases work too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ExamplesError
from .subset import examples_fingerprint

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from .checkpoint import Checkpoint

# Defaults of `load_examples`; the server passes its own (`EMO_MAX_EXAMPLES`, `EMO_MAX_EXAMPLE_CHARS`).
MAX_EXAMPLES = 64
MAX_EXAMPLE_CHARS = 200_000  # ~50k tokens: far above any context, so only absurd inputs are refused
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")

Source = str | os.PathLike[str] | Sequence["str | dict[str, Any] | Example"]


@dataclass(frozen=True)
class Example:
    """One validated example: exactly one of `text` / `messages`; `where` names its origin."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    where: str = "example"

    @property
    def canonical(self) -> str:
        """A stable string for fingerprints (independent of any tokenizer)."""
        if self.text is not None:
            return self.text
        return json.dumps(list(self.messages or ()), sort_keys=True, ensure_ascii=False)

    @property
    def fingerprint(self) -> str:
        return examples_fingerprint(self.canonical)


def load_examples(source: Source, *, max_examples: int = MAX_EXAMPLES,
                  max_chars: int = MAX_EXAMPLE_CHARS) -> list[Example]:
    """Validated examples from a file path or a list of strings / `{"text"}` / `{"messages"}` dicts.

    A `str` is a file path; pass a list to give literal text. At most `max_examples` examples of
    at most `max_chars` characters each (a chat: in all). Raises `ExamplesError` naming the file,
    line or list index of the first problem.
    """
    limits = _Limits(max_examples, max_chars)
    if isinstance(source, (str, os.PathLike)):
        return limits.count(_from_file(Path(source), limits), where=str(source))
    if not isinstance(source, Sequence):
        raise ExamplesError(f"examples: expected a file path or a list, got {type(source).__name__}")
    items = [item if isinstance(item, Example) else _parse_item(item, limits, where=f"examples[{i}]")
             for i, item in enumerate(source)]
    return limits.count(items, where="examples")


def ensure_examples(source: Source) -> list[Example]:
    """`source` as examples: a list made only of `Example`s is taken as it is (they were
    validated when made, perhaps under a server's own limits); anything else is loaded."""
    if (isinstance(source, Sequence) and not isinstance(source, str) and len(source) > 0
            and all(isinstance(e, Example) for e in source)):
        return [e for e in source if isinstance(e, Example)]
    return load_examples(source)


@dataclass(frozen=True)
class _Limits:
    """How many examples, and how long, one call of `load_examples` accepts."""

    examples: int
    chars: int

    @property
    def file_bytes(self) -> int:
        return self.examples * self.chars

    def count(self, examples: list[Example], *, where: str) -> list[Example]:
        if not examples:
            raise ExamplesError(f"{where}: no examples (give 1 to {self.examples})")
        if len(examples) > self.examples:
            raise ExamplesError(f"{where}: {len(examples)} examples, at most {self.examples} are allowed")
        return examples

    def text(self, text: Any, *, where: str) -> str:
        if not isinstance(text, str):
            raise ExamplesError(f"{where}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise ExamplesError(f"{where}: empty example")
        if len(text) > self.chars:
            raise ExamplesError(f"{where}: {len(text)} characters, at most {self.chars} are allowed")
        return text


def _from_file(path: Path, limits: _Limits) -> list[Example]:
    try:
        size = path.stat().st_size
        if size > limits.file_bytes:
            raise ExamplesError(f"{path}: {size} bytes, examples files are limited to {limits.file_bytes}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExamplesError(f"{path}: examples file not found") from None
    except UnicodeDecodeError as exc:
        raise ExamplesError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ExamplesError(f"{path}: cannot read ({exc.strerror})") from None
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                items.append(_parse_item(_json(line, where=f"{path}:{lineno}"), limits, where=f"{path}:{lineno}"))
        return items
    if suffix == ".json":
        data = _json(text, where=str(path))
        if not isinstance(data, list):
            raise ExamplesError(f"{path}: expected a JSON list of examples")
        return [_parse_item(item, limits, where=f"{path}[{i}]") for i, item in enumerate(data)]
    return [Example(text=limits.text(chunk.strip(), where=f"{path} (example {i + 1})"),
                    where=f"{path} (example {i + 1})")
            for i, chunk in enumerate(c for c in _BLANK_LINES.split(text) if c.strip())]


def _json(text: str, *, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExamplesError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _parse_item(item: Any, limits: _Limits, *, where: str) -> Example:
    if isinstance(item, str):
        return Example(text=limits.text(item, where=where), where=where)
    if not isinstance(item, dict):
        raise ExamplesError(f"{where}: expected a string or an object with 'text' or 'messages'")
    keys = {"text", "messages"} & item.keys()
    if len(keys) != 1:
        raise ExamplesError(f"{where}: needs exactly one of 'text' or 'messages', got keys {sorted(item)}")
    if "text" in item:
        return Example(text=limits.text(item["text"], where=f"{where}.text"), where=where)
    return Example(messages=_check_messages(item["messages"], limits, where=f"{where}.messages"), where=where)


def _check_messages(messages: Any, limits: _Limits, *, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise ExamplesError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ExamplesError(f"{at}: expected an object with a 'role' string and 'content'")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            parts = [p["text"] for p in content
                     if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
            if len(parts) != len(content):
                raise ExamplesError(f"{at}.content: only text content parts are supported")
            content = "".join(parts)
        out.append({"role": m["role"], "content": limits.text(content, where=f"{at}.content")})
    if sum(len(m["content"]) for m in out) > limits.chars:
        raise ExamplesError(f"{where}: more than {limits.chars} characters in all")
    return tuple(out)


# -- tokenization ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatTokenizer:
    """The checkpoint's tokenizer plus what rendering a chat needs from `tokenizer_config.json`."""

    tokenizer: Tokenizer
    chat_template: str | None
    special: dict[str, str]  # bos_token, eos_token, ... as template variables

    def encode(self, example: Example) -> list[int]:
        if example.text is not None:
            # As `tokenizer(text)` in transformers: the tokenizer's own post-processor applies.
            return self.tokenizer.encode(example.text).ids
        # As `apply_chat_template(tokenize=True)`: the template already places special tokens.
        return self.tokenizer.encode(self.render(example), add_special_tokens=False).ids

    def render(self, example: Example) -> str:
        if self.chat_template is None:
            raise ExamplesError(f"{example.where}: chat messages given, but the checkpoint's "
                                "tokenizer has no chat_template")
        import jinja2

        try:
            return _compile(self.chat_template).render(
                messages=list(example.messages or ()), add_generation_prompt=False, **self.special)
        except jinja2.TemplateError as exc:
            raise ExamplesError(f"{example.where}: chat template failed: {exc}") from None


def load_tokenizer(ckpt: Checkpoint) -> ChatTokenizer:
    """Tokenizer and chat template from the checkpoint's `tokenizer.json`/`tokenizer_config.json`
    (or `chat_template.jinja`, where newer exports keep the template)."""
    from tokenizers import Tokenizer

    if not ckpt.exists("tokenizer.json"):
        raise ExamplesError(f"{ckpt.location}: no tokenizer.json, cannot tokenize examples")
    try:
        tok = Tokenizer.from_str(ckpt.read_file("tokenizer.json").decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{ckpt.location}/tokenizer.json: cannot load ({exc})") from None
    config: dict[str, Any] = {}
    if ckpt.exists("tokenizer_config.json"):
        try:
            config = json.loads(ckpt.read_file("tokenizer_config.json"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{ckpt.location}/tokenizer_config.json: not valid JSON ({exc})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # the older named-templates form
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and ckpt.exists("chat_template.jinja"):
        template = ckpt.read_file("chat_template.jinja").decode("utf-8")
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        special[key] = value if isinstance(value, str) else ""
    return ChatTokenizer(tok, template if isinstance(template, str) else None, special)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """Compile as transformers' `apply_chat_template` does: sandboxed, trim/lstrip blocks, the
    same helpers, and `{% generation %}` accepted (it only marks assistant spans there)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ExamplesError(f"the checkpoint's chat template does not compile: {exc}") from None


def tokenize_examples(ckpt: Checkpoint, examples: Sequence[Example], max_tokens: int
                      ) -> tuple[list[torch.Tensor], list[str]]:
    """Token ids per example (LongTensor [T]), truncated to `max_tokens` and to the model's
    context; each truncation is reported in the returned warnings (recorded in the output)."""
    import torch

    if max_tokens < 1:
        raise ExamplesError(f"max tokens per example must be >= 1, got {max_tokens}")
    context = ckpt.config.max_position_embeddings
    limit = min(max_tokens, context)
    why = "the model's context" if context < max_tokens else "--max-tokens-per-example"
    tok = load_tokenizer(ckpt)
    vocab = ckpt.config.vocab_size
    out, warnings = [], []
    for ex in examples:
        ids = tok.encode(ex)
        if not ids:
            raise ExamplesError(f"{ex.where}: tokenizes to no tokens")
        if max(ids) >= vocab:
            raise ExamplesError(f"{ex.where}: token id {max(ids)} is outside the model's vocabulary "
                                f"({vocab}); tokenizer and checkpoint do not match")
        if len(ids) > limit:
            warnings.append(f"{ex.where}: {len(ids)} tokens, truncated to {limit} ({why})")
            ids = ids[:limit]
        out.append(torch.tensor(ids, dtype=torch.long))
    return out, warnings
