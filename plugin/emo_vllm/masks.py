"""Per-request expert masks: many subsets of one EMO base served by one vLLM engine.

A subset routes each token only among its kept experts: softmax over the kept router rows,
top-k shrunk to what is kept. Adding 0 / -inf to the full router's logits before the fused MoE
gives exactly that (softmax over -inf is 0, and a zero-weight pick adds nothing), so one engine
holding the union of several subsets' experts can serve each of them, request by request, in
one continuous batch. This is vLLM's LoRA path applied to routing:

* the model owns persistent buffers (`EmoExpertMasks`): per MoE layer a table of mask rows
  (`[slots, experts]`, row 0 all zeros = unmasked) and one per-token row index
  (`[max_num_batched_tokens]`), read by every MoE layer. They are filled in place and never
  replaced, so a traced or graph-captured model sees the new values (a Python value read in
  `forward()` would be frozen by Dynamo at the first trace);
* the model runner (`runner_hook`) turns each scheduled request's row (`SamplingParams.extra_args`, filled by
  the OpenAI server from the body's `vllm_xargs`) into the per-token index once per step, right
  after `_prepare_inputs` computed the token -> batch-row map (`req_indices`), as
  `set_active_loras` does for adapters;
* rows are installed and cleared by control calls between steps (`collective_rpc` to the
  methods of `MaskControl`, part of `emo_vllm.worker.EmoWorkerExtension`), never inside a forward.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from vllm.logger import init_logger

from . import usage
from .runner_hook import extra_args, on_each_step

logger = init_logger("vllm.emo_vllm.masks")

# The request field (inside `vllm_xargs` / `SamplingParams.extra_args`) naming the mask row.
ROW_ARG = "emo_subset_row"
# vLLM's `--additional-config` key that turns masks on and sizes the table (rows incl. row 0).
SLOTS_CONFIG = "emo_subset_slots"


class EmoExpertMasks(nn.Module):
    """The shared per-token row index; each MoE block keeps its own mask table beside it."""

    token_rows: torch.Tensor  # a registered buffer: moves with the model, never replaced

    def __init__(self, slots: int, max_tokens: int) -> None:
        super().__init__()
        self.slots = slots
        self.register_buffer("token_rows", torch.zeros(max_tokens, dtype=torch.long), persistent=False)
        self.installed: dict[int, str] = {}  # row -> subset key, for the control calls


def masks_of(model: nn.Module) -> tuple[EmoExpertMasks, dict[int, torch.Tensor]]:
    """The model's row index and its per-layer mask tables (layer index -> `[slots, experts]`)."""
    found = [m for m in model.modules() if isinstance(m, EmoExpertMasks)]
    if not found:
        raise RuntimeError(f"the model has no expert masks: start it with --additional-config "
                           f"'{{\"{SLOTS_CONFIG}\": N}}'")
    tables: dict[int, torch.Tensor] = {}
    for module in model.modules():  # the MoE blocks (emo.EmoSparseMoeBlock) of shared engines
        table, layer = getattr(module, "subset_masks", None), getattr(module, "layer_index", None)
        if isinstance(table, torch.Tensor) and isinstance(layer, int):
            tables[layer] = table
    return found[0], tables


def install_row_hook(runner: Any, masks: EmoExpertMasks) -> None:
    """Fill `masks.token_rows` every step with the row each scheduled token's request names."""
    if masks.token_rows.device.type != "cpu":
        # The CPU runner's buffers are host memory, written in place; a GPU needs a pinned host
        # copy and a device copy filled before CUDA-graph replay (and GPUs run Model Runner V2).
        raise RuntimeError(f"emo-vllm's expert masks support the CPU runner only, not {masks.token_rows.device}")
    rows_np = masks.token_rows.numpy()  # CPU buffer: a view, written in place

    def fill(states: Sequence[Any], token_batch_rows: np.ndarray) -> None:
        req_rows = np.fromiter((request_row(s, masks) for s in states), dtype=np.int64, count=len(states))
        rows_np[: len(token_batch_rows)] = req_rows[token_batch_rows]

    on_each_step(runner, "masks", fill)


def request_row(state: Any, masks: EmoExpertMasks) -> int:
    """A request's mask row; 0 (unmasked) when it names none, or one that is not installed."""
    row = extra_args(state).get(ROW_ARG, 0)
    if not isinstance(row, int) or row not in masks.installed:
        if row:
            logger.warning("request %s names mask row %r, which is not installed; routing unmasked",
                           getattr(state, "req_id", "?"), row)
        return 0
    return row


class MaskControl:
    """The worker's mask control calls (mixed into `emo_vllm.worker.EmoWorkerExtension`)."""

    model_runner: Any

    def emo_masks_attach(self) -> dict[str, Any]:
        """Install the runner hook (idempotent); answer the table's shape."""
        masks, tables = masks_of(self.model_runner.get_model())
        install_row_hook(self.model_runner, masks)
        return {"slots": masks.slots, "layers": {str(i): int(t.shape[1]) for i, t in sorted(tables.items())},
                "installed": sorted(masks.installed)}

    def emo_set_subset(self, row: str, key: str, kept: str) -> dict[str, Any]:
        """Install mask row `row` for subset `key`: `kept` is JSON {layer: [engine expert ids kept]};
        every id of a listed layer that is not kept gets -inf, other layers stay unmasked."""
        masks, tables = masks_of(self.model_runner.get_model())
        slot = int(row)
        usage.flush_pending()  # buffered tokens are tallied with the rows they routed with
        if not 0 < slot < masks.slots:
            raise ValueError(f"mask row {slot} is outside 1..{masks.slots - 1}")
        keep: dict[str, Sequence[int]] = json.loads(kept)
        for layer, table in tables.items():
            ids = keep.get(str(layer))
            table[slot].zero_()
            if ids is not None:
                drop = torch.ones(table.shape[1], dtype=torch.bool)
                drop[torch.tensor(list(ids), dtype=torch.long)] = False
                table[slot].masked_fill_(drop, float("-inf"))
        masks.installed[slot] = key
        return {"row": slot, "key": key}

    def emo_clear_subset(self, row: str) -> dict[str, Any]:
        """Forget mask row `row`: the row is zeroed and requests naming it route unmasked."""
        masks, tables = masks_of(self.model_runner.get_model())
        slot = int(row)
        usage.flush_pending()
        for table in tables.values():
            table[slot].zero_()
        key = masks.installed.pop(slot, None)
        return {"row": slot, "key": key}

    def emo_installed(self) -> dict[str, str]:
        """Installed rows and the subset each one belongs to."""
        masks, _ = masks_of(self.model_runner.get_model())
        return {str(r): k for r, k in sorted(masks.installed.items())}


__all__ = ["EmoExpertMasks", "MaskControl", "ROW_ARG", "SLOTS_CONFIG", "install_row_hook", "masks_of"]
