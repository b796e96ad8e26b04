"""The profiling methods by name: what the CLI offers, the HTTP API accepts and the profiler runs.

Kept apart from `profiler` (which needs torch) so `emo-serve --help` and the API's protocol
models can list the methods without loading torch.
"""

from __future__ import annotations

METHOD_HELP = {
    "usage": "mean router probability (routed and shared parts each with their own softmax)",
    "frequency": "share of tokens whose top-k holds the expert",
    "layerwise": "usage with earlier layers already restricted to their chosen experts (greedy)",
    "easy_ep": "EASY-EP output-aware importance: g * |E(h)| * (1 - cos(h, h + MoE(h)))",
    "random": "seeded random scores (baseline; no forward pass)",
}
METHODS = tuple(METHOD_HELP)
