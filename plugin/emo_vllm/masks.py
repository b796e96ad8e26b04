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
* before each forward, `step_inputs` turns each scheduled request's row (`SamplingParams.extra_args`,
  filled by the OpenAI server from the body's `vllm_xargs`) into the per-token index, as
  `set_active_loras` does for adapters: through the model's `ModelState` on Model Runner V2, and
  a hook on `_prepare_inputs` on the V1 runner;
* rows are installed and cleared by control calls between steps (`collective_rpc` to the
  methods of `MaskControl`, part of `emo_vllm.worker.EmoWorkerExtension`), never inside a forward.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .step_inputs import ROW_ARG, attach_step_inputs
from .usage import flush_tallies

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


class MaskControl:
    """The worker's mask control calls (mixed into `emo_vllm.worker.EmoWorkerExtension`)."""

    model_runner: Any

    def emo_masks_attach(self) -> dict[str, Any]:
        """Make sure each step fills the rows (idempotent); answer the table's shape and runner."""
        masks, tables = masks_of(self.model_runner.get_model())
        runner = attach_step_inputs(self.model_runner)
        return {"slots": masks.slots, "layers": {str(i): int(t.shape[1]) for i, t in sorted(tables.items())},
                "installed": sorted(masks.installed), "runner": runner}

    def emo_set_subset(self, row: str, key: str, kept: str) -> dict[str, Any]:
        """Install mask row `row` for subset `key`: `kept` is JSON {layer: [engine expert ids kept]};
        every id of a listed layer that is not kept gets -inf, other layers stay unmasked."""
        masks, tables = masks_of(self.model_runner.get_model())
        slot = int(row)
        if not 0 < slot < masks.slots:
            raise ValueError(f"mask row {slot} is outside 1..{masks.slots - 1}")
        keep: dict[str, Sequence[int]] = json.loads(kept)
        flush_tallies()  # buffered steps were routed under the row as it was
        for layer, table in tables.items():
            ids = keep.get(str(layer))
            table[slot].zero_()
            if ids is not None:
                drop = torch.ones(table.shape[1], dtype=torch.bool, device=table.device)
                drop[torch.tensor(list(ids), dtype=torch.long, device=table.device)] = False
                table[slot].masked_fill_(drop, float("-inf"))
        masks.installed[slot] = key
        return {"row": slot, "key": key}

    def emo_clear_subset(self, row: str) -> dict[str, Any]:
        """Forget mask row `row`: the row is zeroed and requests naming it route unmasked."""
        masks, tables = masks_of(self.model_runner.get_model())
        slot = int(row)
        flush_tallies()
        for table in tables.values():
            table[slot].zero_()
        key = masks.installed.pop(slot, None)
        return {"row": slot, "key": key}

    def emo_installed(self) -> dict[str, str]:
        """Installed rows and the subset each one belongs to."""
        masks, _ = masks_of(self.model_runner.get_model())
        return {str(r): k for r, k in sorted(masks.installed.items())}


__all__ = ["EmoExpertMasks", "MaskControl", "ROW_ARG", "SLOTS_CONFIG", "masks_of"]
