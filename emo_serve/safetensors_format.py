"""The safetensors file format, byte by byte: header parsing with bounds checks, and a streaming
writer that knows every tensor's place before the first byte is written.

Layout: 8-byte little-endian header length N, N bytes of JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the
data buffer; offsets are relative to the start of the buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import torch

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap
HEADER_ALIGNMENT = 8

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard, dtype, shape and absolute byte range in the shard."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the shard file
    end: int  # exclusive
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", self.end - self.start)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def header_length(prefix: bytes, *, source: str) -> int:
    """Length of the JSON header, from the first 8 bytes of a shard."""
    if len(prefix) < 8:
        raise CheckpointError(f"{source}: file is too short to be safetensors ({len(prefix)} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{source}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
    return n


def parse_header(header: bytes, *, shard: str, file_size: int) -> dict[str, TensorInfo]:
    """Parse and bounds-check a shard's JSON header; returns tensors by name."""
    try:
        table = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{shard}: header is not valid JSON ({exc})") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{shard}: header is not a JSON object")
    table.pop("__metadata__", None)
    data_start = 8 + len(header)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in table.items():
        where = f"{shard}: tensor {name!r}"
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: malformed header entry {entry!r}") from None
        if not (_is_count(begin) and _is_count(end)):
            raise CheckpointError(f"{where}: malformed header entry {entry!r} (offsets must be integers)")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: invalid shape {shape!r}")
        info = TensorInfo(name, shard, dtype, tuple(shape), data_start + begin, data_start + end)
        expected = info.numel * DTYPES[dtype].itemsize
        if not 0 <= begin <= end or info.nbytes != expected:
            raise CheckpointError(
                f"{where}: data_offsets {[begin, end]} hold {end - begin} bytes, "
                f"dtype {dtype} x shape {list(shape)} needs {expected}"
            )
        if info.end > file_size:
            raise CheckpointError(
                f"{where}: byte range {info.start}..{info.end} is out of bounds "
                f"(file has {file_size} bytes; truncated shard?)"
            )
        tensors[name] = info
    return tensors


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (JSON `true` parses as a Python int; it is not one here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: known before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the order of `specs`.

    The header is written first from the specs, so no tensor has to be held in memory beyond
    the one being written: that is what lets a 28 GB checkpoint stream to disk.
    """

    def __init__(self, path: str | os.PathLike[str], specs: Iterable[TensorSpec],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = os.fspath(path)
        self.specs = list(specs)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for spec in self.specs:
            if spec.dtype not in DTYPE_NAMES:
                raise CheckpointError(f"{self.path}: tensor {spec.name!r}: unsupported dtype {spec.dtype}")
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
        self._header = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> SafetensorsWriter:
        self._file = open(self.path, "wb")
        self._file.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert self._file is not None, "use SafetensorsWriter as a context manager"
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(
                f"{self.path}: expected tensor {spec.name!r} {spec.dtype} {list(spec.shape)}, "
                f"got {name!r} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)  # a view: no copy
        self._next += 1

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._file is not None
        self._file.close()
        if exc is None and self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next:]]
            raise CheckpointError(f"{self.path}: {len(missing)} tensors never written: {missing[:3]}")
