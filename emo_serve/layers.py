"""The model streamed one decoder layer at a time: the primitive under the reference forward, the
profiler and `eval`.

A layer's weights are read (by byte range, from any location the reader supports), converted to
the compute dtype and device, handed to the caller, and dropped before the next layer is read,
so peak memory is about one layer plus activations whatever the model's size: the 28 GB model
runs in a few GB. On a local base the next layer's bytes are read ahead into the page cache while
the caller computes on this one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, coalesce
from .errors import EmoServeError
from .schema import DTYPES, layer_tensor_names

LayerWeights = dict[str, torch.Tensor]  # short names: "q_proj", ..., "gate", "experts.3.up_proj"


class ComputeError(EmoServeError):
    """A dtype or device that this machine cannot compute in."""


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A dtype given by name (`float32`, `bfloat16`, `float16`: the CLI's and the config's
    names) or as itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ComputeError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def as_device(device: str | torch.device) -> torch.device:
    """A device this machine has: a CUDA device without CUDA fails here, not mid-forward."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ComputeError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ComputeError(f"device {device!r}: CUDA is not available on this machine")
    return dev


def release_memory_eagerly() -> bool:
    """Make glibc serve allocations of 1 MiB and more with mmap, process-wide, so a dropped layer
    goes back to the OS at once. Otherwise malloc's adaptive threshold moves the 8 MB converted
    weight tensors and the reader's chunk buffers onto the heap, where they fragment: loading one
    emo-1b14b layer as float32 from bfloat16 then peaks at 4.1 GB instead of 3.4 GB. The CLI calls
    this; a long-lived process (server) may prefer not to. Returns whether it took effect."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    m_mmap_threshold = -3  # from <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 20))


def load_layer(ckpt: Checkpoint, layer: int, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LayerWeights:
    """One decoder layer's tensors, keyed by their name after `model.layers.{i}.`."""
    prefix = f"model.layers.{layer}."
    names = layer_tensor_names(ckpt.config, layer)
    out: LayerWeights = {}
    for name, t in ckpt.read_many(names):
        key = name[len(prefix):].replace("self_attn.", "").replace("mlp.", "")
        out[key.removesuffix(".weight")] = t.to(device=device, dtype=dtype)
    return out


def stream_layers(ckpt: Checkpoint, *, dtype: torch.dtype, device: torch.device | str,
                  desc: str | None = None) -> Iterator[tuple[int, LayerWeights]]:
    """Yield `(layer, weights)` for every decoder layer in order, reading the next one ahead.

    The weights are cleared when the caller asks for the next layer, so a caller that still holds
    the dict (or a hook closing over it) never keeps two layers resident. `desc` shows a progress
    bar with that label.
    """
    read_ahead = ReadAhead(ckpt)
    try:
        for layer in tqdm(range(ckpt.config.num_hidden_layers), desc=desc, unit="layer",
                          disable=desc is None, leave=False):
            read_ahead.close()  # normally long done; else this layer's own read takes over
            weights = load_layer(ckpt, layer, dtype=dtype, device=device)
            read_ahead.start(layer + 1)
            yield layer, weights
            weights.clear()  # only one layer's weights are ever resident
    finally:
        read_ahead.close()


class ReadAhead:
    """Reads a local checkpoint's next layer in a background thread into a small reused buffer,
    so its bytes are in the OS page cache when the layer is loaded and disk reads overlap the
    current layer's compute. The page cache is not process memory: no second layer is held in
    RAM. (`posix_fadvise(WILLNEED)` would be simpler, but Linux caps it at the readahead window.)
    Remote bases are read on demand as usual."""

    CHUNK = 8 * 1024 * 1024

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.enabled = isinstance(ckpt.fs, LocalFileSystem)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, layer: int) -> None:
        if not self.enabled or layer >= self.ckpt.config.num_hidden_layers:
            return
        self.close()
        self.stop.clear()
        names = layer_tensor_names(self.ckpt.config, layer)
        runs = [(self.ckpt.path(r[0].shard.rsplit("/", 1)[-1]), r[0].start, r[-1].end)
                for r in coalesce(self.ckpt.tensors[n] for n in names)]
        self.thread = threading.Thread(target=self._read, args=(runs,), name="emo-read-ahead", daemon=True)
        self.thread.start()

    def _read(self, runs: list[tuple[str, int, int]]) -> None:
        buf = bytearray(self.CHUNK)
        for path, start, end in runs:
            try:
                with open(path, "rb", buffering=0) as f:
                    f.seek(start)
                    while start < end and not self.stop.is_set():
                        n = f.readinto(memoryview(buf)[: min(self.CHUNK, end - start)])
                        if not n:
                            break
                        start += n
            except OSError:
                return  # only a hint: the real read reports any error

    def close(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None
