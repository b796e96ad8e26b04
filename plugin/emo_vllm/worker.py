"""Control calls on each worker: `--worker-extension-cls emo_vllm.worker.EmoWorkerExtension`.

The OpenAI server's `/collective_rpc` (dev mode) passes string arguments only; each method parses
its own JSON. Utility calls run between engine steps, so they never race a forward.
"""

from __future__ import annotations

from .masks import MaskControl
from .slots import SlotControl
from .usage import UsageControl


class EmoWorkerExtension(MaskControl, SlotControl, UsageControl):
    """Expert-mask rows (`masks`), expert slots (`slots`) and routing capture (`usage`)."""


__all__ = ["EmoWorkerExtension"]
