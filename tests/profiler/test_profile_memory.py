"""Peak memory while profiling a 16-layer, 1 GB checkpoint stays near one layer, not the model.

Measured in a fresh subprocess (clean RSS): warm up on the tiny model so torch's and the
tokenizer's one-time allocations are paid, reset the kernel's peak-RSS mark
(`/proc/self/clear_refs`), profile the big checkpoint, read the peak (`VmHWM`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.schema import layer_tensor_names

FIXED_OVERHEAD = 64 * 2**20  # interpreter/allocator slack, code paths first taken on the big model

SCRIPT = textwrap.dedent("""
    import json, re, sys
    from emo_serve.profiler import profile

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024

    tiny, big, method, text = sys.argv[1:5]
    profile(tiny, [text], method=method, layerwise_size=2, progress=False)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    before = status("VmRSS")
    scores = profile(big, [text, text[::-1]], method=method, layerwise_size=2, progress=False)
    print(json.dumps({"before": before, "peak": status("VmHWM"), "tokens": sum(scores.example_tokens)}))
""")


def measure(tiny: Path, big: Path, method: str) -> dict[str, int]:
    text = "def mean(xs):\\n    return sum(xs) / len(xs)\\n" * 8
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny), str(big), method, text],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("method", ["usage", "layerwise"])
def test_peak_memory_is_about_one_layer(tiny_ckpt, big_ckpt, method):
    ckpt = Checkpoint(big_ckpt)
    cfg = ckpt.config
    total = ckpt.total_tensor_bytes
    layer = max(sum(ckpt.tensors[n].nbytes for n in layer_tensor_names(cfg, i)) for i in range(cfg.num_hidden_layers))
    assert cfg.num_hidden_layers == 16 and total >= 1e9
    got = measure(tiny_ckpt, big_ckpt, method)
    # Activations: a few [tokens, width] float32 buffers per sequence, the attention matrix,
    # and the embedding table that `embed` reads once.
    width = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts)
    activations = 16 * got["tokens"] * width * 4 + cfg.num_attention_heads * got["tokens"] ** 2 * 4
    embedding = ckpt.tensors["model.embed_tokens.weight"].nbytes
    bound = 2 * layer + activations + embedding + FIXED_OVERHEAD
    assert bound < total / 2  # the bound tells "one layer at a time" from "the whole model"
    growth = got["peak"] - got["before"]
    assert growth < bound, (f"peak grew by {growth / 2**20:.0f} MiB while profiling; bound "
                            f"{bound / 2**20:.0f} MiB (layer {layer / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB)")
    assert growth > layer / 2  # and it did read layers (the measurement is not vacuous)
