"""A layers x experts heatmap of profiling scores with the kept experts marked (PNG, headless).

Uses matplotlib's object API with the Agg canvas, never pyplot, so it neither needs a display
nor changes the backend of a program that imports it.

The server draws them for `/ui` and its refreshes: a `Heatmap` names what a picture shows by a
digest of its inputs (`etag`), and `HeatmapCache` draws each such picture once, so an unchanged
heatmap costs a hash rather than a drawing (a few hundred ms of CPU each).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .errors import SubsetError
from .files import atomic_write_bytes

if TYPE_CHECKING:  # the profiler imports torch; plotting a manifest should not need it
    from .config import EmoConfig
    from .profiler import Scores
    from .subset import SubsetSpec


def heatmap(path: str | os.PathLike[str], *, scores: Sequence[Sequence[float]] | None,
            kept: Sequence[Sequence[int]] | None, shared: Sequence[Sequence[int]], title: str,
            experts_per_layer: Sequence[int]) -> None:
    """Write `heatmap_png` to `path` atomically."""
    atomic_write_bytes(path, heatmap_png(scores=scores, kept=kept, shared=shared, title=title,
                                         experts_per_layer=experts_per_layer))


def heatmap_png(*, scores: Sequence[Sequence[float]] | None, kept: Sequence[Sequence[int]] | None,
                shared: Sequence[Sequence[int]], title: str, experts_per_layer: Sequence[int]) -> bytes:
    """A PNG: rows are layers, columns expert ids. With `scores`, colour is each routed
    expert's score relative to its layer's best (layers then compare); without, kept = 1.
    Shared experts (always kept) and missing ids (dense layers, smaller layers) are blank; kept
    experts get a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, width = len(experts_per_layer), max(experts_per_layer, default=0) or 1
    grid = np.full((layers, width), np.nan)
    for layer, n in enumerate(experts_per_layer):
        if scores is not None:
            row = np.asarray(scores[layer], dtype=float)
            routed = np.ones(n, dtype=bool)
            routed[list(shared[layer])] = False
            top = row[routed].max() if routed.any() else 0.0
            grid[layer, :n] = row / top if top > 0 else row
        else:
            grid[layer, :n] = 0.0
            if kept is not None:
                grid[layer, list(kept[layer])] = 1.0
        grid[layer, list(shared[layer])] = np.nan

    fig = Figure(figsize=(min(24.0, max(6.5, 3.0 + width * 0.12)), 1.6 + layers * 0.32), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                      cmap="viridis", vmin=0.0, vmax=1.0)
    if kept is not None:
        ys, xs = zip(*[(layer, e) for layer, ids in enumerate(kept) for e in ids
                       if e not in shared[layer]]) or ((), ())
        ax.scatter(xs, ys, s=9, c="red", marker="o")
        title += "; red dots: kept"
    ax.set_xlabel("expert id (shared experts blank: always kept)")
    ax.set_ylabel("layer")
    ax.set_yticks(range(layers))
    ax.set_title(title, fontsize=9)
    if scores is not None:
        fig.colorbar(image, ax=ax, label="score / layer's best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@dataclass(frozen=True)
class Heatmap:
    """The arguments of `heatmap_png`, and `etag`: a digest of exactly them, so two requests for
    the same picture are known to be the same without drawing either."""

    scores: Sequence[Sequence[float]] | None
    kept: Sequence[Sequence[int]] | None
    shared: Sequence[Sequence[int]]
    title: str
    experts_per_layer: Sequence[int]

    @cached_property
    def etag(self) -> str:
        digest = hashlib.sha256(json.dumps([self.title, self.kept, self.shared, self.experts_per_layer,
                                            self.scores is None]).encode())
        for row in self.scores or ():  # the bytes of each row, its length first: rows cannot run together
            values = np.asarray(row, dtype=np.float64)
            digest.update(len(values).to_bytes(8, "little") + values.tobytes())
        return digest.hexdigest()[:32]

    def png(self) -> bytes:
        return heatmap_png(scores=self.scores, kept=self.kept, shared=self.shared, title=self.title,
                           experts_per_layer=self.experts_per_layer)


class HeatmapCache:
    """The last `size` heatmaps drawn, by `Heatmap.etag`, drawn on a worker thread; requests for a
    picture being drawn wait for that drawing instead of starting another. Used on one event loop."""

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self.renders = 0  # drawings made: what the cache saves is the requests beyond these
        self._pngs: OrderedDict[str, bytes] = OrderedDict()
        self._drawing: dict[str, asyncio.Future[bytes]] = {}

    async def png(self, heatmap: Heatmap) -> bytes:
        key = heatmap.etag
        if (png := self._pngs.get(key)) is not None:
            self._pngs.move_to_end(key)
            return png
        drawing = self._drawing.get(key)
        if drawing is None:
            drawing = self._drawing[key] = asyncio.ensure_future(self._draw(key, heatmap))
        # A client that goes away cancels its own wait, not the drawing the others wait for.
        return await asyncio.shield(drawing)

    async def _draw(self, key: str, heatmap: Heatmap) -> bytes:
        try:
            png = await asyncio.to_thread(heatmap.png)
        finally:
            del self._drawing[key]
        self.renders += 1
        self._pngs[key] = png
        while len(self._pngs) > self.size:
            self._pngs.popitem(last=False)
        return png


def plot_profile(path: str | os.PathLike[str], *, scores: Scores | None = None,
                 spec: SubsetSpec | None = None, config: EmoConfig | None = None,
                 kept: Sequence[Sequence[int]] | None = None) -> None:
    """Heatmap of `scores` and/or the experts `spec` keeps (or `kept`, e.g. a scores file's
    top-K). Without scores, the layer shapes come from the base's `config`."""
    if spec is not None:
        kept = spec.experts
    if scores is not None:
        per_layer = [len(s) for s in scores.scores]
        shared = scores.shared
        what = f"{scores.method} scores on {len(scores.example_fingerprints)} example(s)"
    elif config is not None:
        per_layer = config.experts_per_layer
        shared = [config.layer_routing(i).shared_ids for i in range(len(per_layer))]
        what = "kept experts"
    else:
        raise TypeError("plot_profile needs scores or the base config")  # a caller's bug, not bad input
    if kept is not None and len(kept) != len(per_layer):
        raise SubsetError(f"the subset lists {len(kept)} layers, the scores/base have {len(per_layer)}")
    title = f"{spec.name}: {what}" if spec is not None else what
    if kept is not None:
        title += f" ({sum(len(k) for k in kept)} kept incl. shared)"
    heatmap(path, scores=scores.scores if scores else None, kept=kept, shared=shared, title=title,
            experts_per_layer=per_layer)
