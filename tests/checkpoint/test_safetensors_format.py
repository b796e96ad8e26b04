"""The safetensors byte layout, checked against the `safetensors` library on tiny handmade files
(bf16, scalar, empty and odd-sized tensors), plus the header parser's bounds checks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from emo_serve.errors import CheckpointError
from emo_serve.safetensors_format import (
    SafetensorsWriter,
    TensorSpec,
    header_length,
    parse_header,
)


def handmade() -> dict[str, torch.Tensor]:
    """Named so that the library's own order (by dtype alignment, then name) is easy to follow."""
    return {
        "a.scalar": torch.tensor(3.5, dtype=torch.float32),
        "b.empty": torch.empty(0, 4, dtype=torch.float32),
        "c.f64": torch.arange(3, dtype=torch.float64) / 7,
        "d.bf16": (torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3).to(torch.bfloat16),
        "e.i8": torch.tensor([-1, 0, 5], dtype=torch.int8),
        "f.bool": torch.tensor([True, False]),
        "g.f16": torch.tensor([[1.5, -2.25]], dtype=torch.float16),
    }


def library_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The order `safetensors.torch.save` lays tensors out in, read back from its own header."""
    raw = safetensors.torch.save(tensors)
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda n: header[n]["data_offsets"])


def write_ours(path: Path, tensors: dict[str, torch.Tensor], order: list[str]) -> None:
    specs = [TensorSpec(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in order]
    with SafetensorsWriter(path, specs) as writer:
        for name in order:
            writer.write(name, tensors[name])


def test_writer_output_is_byte_identical_to_the_library(tmp_path: Path) -> None:
    tensors = handmade()
    order = library_order(tensors)
    write_ours(tmp_path / "ours.safetensors", tensors, order)
    theirs = safetensors.torch.save(tensors, metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == theirs


@pytest.mark.parametrize("order", ["library", "reversed"])
def test_library_reads_what_the_writer_wrote(tmp_path: Path, order: str) -> None:
    tensors = handmade()
    names = library_order(tensors)
    if order == "reversed":  # unaligned offsets: f64 after bool/i8 bytes
        names = names[::-1]
    write_ours(tmp_path / "w.safetensors", tensors, names)
    loaded = safetensors.torch.load_file(tmp_path / "w.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name], t), name


def test_parser_matches_the_library_file(tmp_path: Path) -> None:
    tensors = handmade()
    raw = safetensors.torch.save(tensors, metadata={"format": "pt"})
    n = header_length(raw[:8], source="t")
    infos = parse_header(raw[8 : 8 + n], shard="t.safetensors", file_size=len(raw))
    assert set(infos) == set(tensors)
    for name, t in tensors.items():
        info = infos[name]
        assert info.shape == tuple(t.shape)
        assert info.torch_dtype == t.dtype
        assert info.nbytes == t.numel() * t.element_size()
        data = bytearray(raw[info.start : info.end])
        if info.nbytes:
            got = torch.frombuffer(data, dtype=info.torch_dtype).reshape(info.shape)
            assert torch.equal(got, t)
    assert infos["a.scalar"].shape == () and infos["a.scalar"].numel == 1
    assert infos["b.empty"].nbytes == 0


def test_writer_rejects_a_tensor_that_does_not_match_its_spec(tmp_path: Path) -> None:
    spec = TensorSpec("w", torch.float32, (2, 2))
    with pytest.raises(CheckpointError, match=r"expected tensor 'w'.*got 'w' torch.bfloat16"):
        with SafetensorsWriter(tmp_path / "x.safetensors", [spec]) as writer:
            writer.write("w", torch.zeros(2, 2, dtype=torch.bfloat16))


def test_writer_refuses_to_close_with_tensors_missing(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float32, (1,)), TensorSpec("b", torch.float32, (1,))]
    with pytest.raises(CheckpointError, match=r"1 tensors never written: \['b'\]"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as writer:
            writer.write("a", torch.zeros(1))


def header_of(entries: dict[str, object]) -> bytes:
    return json.dumps(entries).encode()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, None),
        ({"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}, r"tensor 'w': unsupported dtype 'F4'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}, r"tensor 'w': data_offsets \[0, 12\]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"tensor 'w': data_offsets \[8, 0\]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [992, 1000]}, r"tensor 'w': byte range .* out of bounds"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, r"tensor 'w': invalid shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}, r"tensor 'w': malformed"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, r"tensor 'w': invalid shape"),
        ({"dtype": "F32", "shape": [2]}, r"tensor 'w': malformed header entry"),
        ("not an object", r"tensor 'w': malformed header entry"),
    ],
)
def test_parse_header_checks_every_entry(entry: object, message: str | None) -> None:
    header = header_of({"__metadata__": {"format": "pt"}, "w": entry})
    size = 8 + len(header) + 8
    if message is None:
        assert parse_header(header, shard="s.safetensors", file_size=size)["w"].nbytes == 8
    else:
        with pytest.raises(CheckpointError, match=r"^s\.safetensors: " + message):
            parse_header(header, shard="s.safetensors", file_size=size)


def test_parse_header_rejects_non_json_and_non_objects() -> None:
    with pytest.raises(CheckpointError, match="s: header is not valid JSON"):
        parse_header(b"{not json", shard="s", file_size=100)
    with pytest.raises(CheckpointError, match="s: header is not a JSON object"):
        parse_header(b"[1, 2]", shard="s", file_size=100)


def test_header_length_bounds() -> None:
    with pytest.raises(CheckpointError, match="too short"):
        header_length(b"\x01\x02", source="s")
    with pytest.raises(CheckpointError, match="exceeds"):
        header_length(struct.pack("<Q", 2**40), source="s")
    assert header_length(struct.pack("<Q", 16) + b"{}", source="s") == 16
