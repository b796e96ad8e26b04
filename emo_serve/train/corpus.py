"""The training corpus: four domains that any Debian machine with Python already holds.

- ``code``: Python standard-library source files;
- ``prose``: English documentation — man pages (roff markup stripped) and GNU info manuals,
  falling back to standard-library docstrings where neither is installed;
- ``legal``: licence texts (``/usr/share/common-licenses``, Debian ``copyright`` files);
- ``math``: generated arithmetic (seeded).

Each document belongs to exactly one domain; train and held-out documents are split by a hash
of the document's name, so the split does not depend on which other files exist.
"""

from __future__ import annotations

import ast
import gzip
import random
import re
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("code", "prose", "legal", "math")
HELDOUT_PERCENT = 10
MIN_CHARS = 400


@dataclass(frozen=True)
class Document:
    domain: str
    name: str
    text: str

    @property
    def heldout(self) -> bool:
        return zlib.crc32(self.name.encode()) % 100 < HELDOUT_PERCENT


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _capped(docs: Iterator[Document], max_chars: int) -> list[Document]:
    """Documents in order until `max_chars` in all, each at least MIN_CHARS long."""
    out, total = [], 0
    for doc in docs:
        if len(doc.text) < MIN_CHARS:
            continue
        out.append(doc)
        total += len(doc.text)
        if total >= max_chars:
            break
    return out


def _spread(paths: list[Path], seed: str) -> list[Path]:
    """A deterministic shuffle, so a character cap samples all packages, not the first letters."""
    return sorted(paths, key=lambda p: zlib.crc32(f"{seed}:{p}".encode()))


def code_documents(max_chars: int) -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "encodings")
    paths = [p for p in stdlib.rglob("*.py") if not set(p.relative_to(stdlib).parts) & set(skip)]
    return _capped((Document("code", f"stdlib/{p.relative_to(stdlib)}", _read(p))
                    for p in _spread(paths, "code")), max_chars)


_ROFF_ESCAPES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\[(*]\(?(aq|cq|oq)"), "'"),
    (re.compile(r"\\[(*]\(?(dq|lq|rq|Lq|Rq)"), '"'),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\*\[[^\]]*\]|\\\*\(..|\\\*."), ""),  # string registers
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&,/|^~ 0:%]"), lambda m: " " if m.group(0) in ("\\ ", "\\~", "\\0") else ""),
    (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r'\\".*'), ""),
]
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "TP", "IP", "Nm",
                "Nd", "Dl", "It", "Ar", "Fl", "Xr", "Pa", "Cm", "Em", "Sy", "Li", "Va", "Ev"}


def roff_to_text(source: str) -> str:
    """Readable text from a man page: keep prose and macro arguments, drop the markup."""
    lines = []
    for raw in source.splitlines():
        line = raw.rstrip()
        if line.startswith((".\\\"", "'\\\"", '."')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts or parts[0] not in _TEXT_MACROS or len(parts) < 2:
                if parts and parts[0] in ("PP", "P", "LP", "sp", "Pp"):
                    lines.append("")
                continue
            line = parts[1].replace('"', "")
            if parts[0] in ("SH", "SS"):
                lines += ["", line.upper() if parts[0] == "SH" else line]
                continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _docstring_documents() -> Iterator[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _spread(list(stdlib.glob("*.py")), "docstrings"):
        try:
            tree = ast.parse(_read(path))
        except SyntaxError:
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        docs = [ast.get_docstring(n) for n in nodes]
        yield Document("prose", f"docstrings/{path.name}", "\n\n".join(d for d in docs if d))


def prose_documents(max_chars: int) -> list[Document]:
    man = Path("/usr/share/man")
    # Cloud-SDK pages number in thousands and repeat one template: they would drown the rest.
    pages = [p for sec in ("man1", "man5", "man7", "man8") for p in (man / sec).glob("*.gz")
             if not p.name.startswith(("gcloud", "bq", "gsutil"))]
    info = sorted(Path("/usr/share/info").glob("*.info*.gz"))

    def info_nodes(path: Path) -> list[Document]:
        # Info manuals are long: one document per node keeps documents comparable in size.
        return [Document("prose", f"info/{path.name}#{i}", node.strip() + "\n")
                for i, node in enumerate(_read(path).split("\x1f")[1:])]

    def generate() -> Iterator[Document]:
        # Alternate a man page and an info node, so both kinds of documentation are sampled.
        nodes = iter([d for path in info for d in info_nodes(path)])
        for path in _spread(pages, "man"):
            yield Document("prose", f"man/{path.parent.name}/{path.name}", roff_to_text(_read(path)))
            node = next(nodes, None)
            if node is not None:
                yield node
        yield from nodes
        yield from _docstring_documents()

    return _capped(generate(), max_chars)


def legal_documents(max_chars: int) -> list[Document]:
    licenses = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    copyrights = _spread(list(Path("/usr/share/doc").glob("*/copyright")), "legal")

    def generate() -> Iterator[Document]:
        for path in licenses:
            yield Document("legal", f"licenses/{path.name}", _read(path))
        for path in copyrights:
            yield Document("legal", f"copyright/{path.parent.name}", _read(path))

    return _capped(generate(), max_chars)


_ARITH_FORMS = (
    lambda r, a, b: f"{a} + {b} = {a + b}",
    lambda r, a, b: f"{a + b} - {b} = {a}",
    lambda r, a, b: f"{a % 100} * {b % 20} = {(a % 100) * (b % 20)}",
    lambda r, a, b: f"What is {a} plus {b}? The answer is {a + b}.",
    lambda r, a, b: f"What is {a} minus {b}? The answer is {a - b}.",
    lambda r, a, b: f"Compute {a % 50} times {b % 12}: {(a % 50) * (b % 12)}.",
    lambda r, a, b: f"Is {a} greater than {b}? {'Yes' if a > b else 'No'}.",
    lambda r, a, b: f"If x + {b} = {a + b}, then x = {a}.",
    lambda r, a, b: f"{a * 2} / 2 = {a}",
    lambda r, a, b: f"The sum of {a}, {b} and {r.randrange(10)} is {{s}}.",
)


def math_documents(count: int, seed: int = 0) -> list[Document]:
    """Worksheets of generated arithmetic, one fact per line; seeded so runs are repeatable."""
    docs = []
    for i in range(count):
        r = random.Random(seed * 1_000_003 + i)
        lines = [f"Worksheet {i + 1}."]
        for _ in range(r.randrange(30, 70)):
            a, b = r.randrange(1000), r.randrange(1, 1000)
            form = r.randrange(len(_ARITH_FORMS))
            line = _ARITH_FORMS[form](r, a, b)
            if "{s}" in line:
                c = int(line.split(" and ")[1].split(" ")[0])
                line = line.replace("{s}", str(a + b + c))
            lines.append(line)
        docs.append(Document("math", f"math/{seed}/{i}", "\n".join(lines) + "\n"))
    return docs


def build_corpus(max_chars_per_domain: int = 4_000_000, seed: int = 0) -> dict[str, list[Document]]:
    """All documents per domain; the math count follows the other domains' mean size."""
    corpus = {
        "code": code_documents(max_chars_per_domain),
        "prose": prose_documents(max_chars_per_domain),
        "legal": legal_documents(max_chars_per_domain),
    }
    mean_chars = 1500
    corpus["math"] = math_documents(max_chars_per_domain // mean_chars, seed)
    empty = [d for d, docs in corpus.items() if not docs]
    if empty:
        raise RuntimeError(f"no documents found for domain(s) {empty}: is this a Debian machine with Python?")
    return corpus


def excerpt(text: str, start_fraction: float, max_chars: int) -> str:
    """About `max_chars` of `text` from a line boundary near `start_fraction` of it, ending at a
    line boundary: the middle of a source file is code, its top is a docstring."""
    start = 0 if len(text) <= max_chars else text.rfind("\n", 0, int(len(text) * start_fraction)) + 1
    chunk = text[start:start + max_chars]
    cut = chunk.rfind("\n", max_chars // 2)
    return (chunk[:cut] if cut > 0 and len(chunk) == max_chars else chunk).strip() + "\n"


def example_files(corpus: dict[str, list[Document]], *, profile: int = 5, evaluate: int = 20,
                  max_chars: int = 1600) -> dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """Per domain, held-out excerpts: `profile` for choosing a subset (one per document) and
    `evaluate` from other documents (up to three excerpts each) for measuring it."""
    out = {}
    for domain, docs in corpus.items():
        held = sorted((d for d in docs if d.heldout), key=lambda d: zlib.crc32(d.name.encode()))
        if len(held) <= profile:
            raise RuntimeError(f"{domain}: only {len(held)} held-out documents")
        first = [{"text": excerpt(d.text, 0.3, max_chars), "source": d.name} for d in held[:profile]]
        rest: list[dict[str, str]] = []
        for per_doc in (1, 2, 3):  # widen to more excerpts per document only if needed
            texts = {(excerpt(d.text, f, max_chars), d.name): None  # short documents give one
                     for d in held[profile:] for f in (0.2, 0.5, 0.8)[:per_doc]}
            rest = [{"text": text, "source": name} for text, name in texts]
            if len(rest) >= evaluate:
                break
        out[domain] = (first, rest[:evaluate])
    return out
