"""`evaluate` streams the base one layer at a time: peak memory stays near one layer's weights
(plus activations), far below the checkpoint, however many subsets ride along."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint

# Run in a fresh interpreter so the peak RSS is this evaluation's alone. `baseline` stops
# after everything but the forward pass (imports, headers, tokenizer, subsets).
SCRIPT = """
import json, resource, sys
from emo_serve.checkpoint import Checkpoint
from emo_serve.evaluate import evaluate
from emo_serve.examples import load_examples, tokenize_examples
from emo_serve.subset import random_subset
ckpt = Checkpoint(sys.argv[1])
examples = ["def add(a, b):\\n    return a + b\\n" * 4, "The licence grants the right to copy. " * 6]
tokenize_examples(ckpt, load_examples(examples), 512)
subsets = [random_subset(ckpt, 16, "a", seed=1), random_subset(ckpt, 16, "b", seed=2)]
if sys.argv[2] == "evaluate":
    report = evaluate(ckpt, subsets, examples, progress=False)
    assert report.tokens > 50, report.tokens
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 layers, 80 experts of 512 x 256, bf16: ~1.0 GB in 4 shards, ~63 MB per layer."""
    from emo_serve.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("big") / "big", "tiny", shards=4,
                                 num_hidden_layers=16, hidden_size=512, num_attention_heads=8,
                                 intermediate_size=256, num_experts=80, torch_dtype="bfloat16")


def _peak_rss(ckpt: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), mode], capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]


def test_peak_memory_is_about_one_layer(big_ckpt: Path) -> None:
    ckpt = Checkpoint(big_ckpt)
    total = ckpt.total_tensor_bytes
    assert total >= 1_000_000_000
    layer_fp32 = 2 * sum(t.nbytes for n, t in ckpt.tensors.items() if n.startswith("model.layers.0."))
    baseline = _peak_rss(big_ckpt, "baseline")
    peak = _peak_rss(big_ckpt, "evaluate")
    grown = peak - baseline
    # The layer as read (bf16) and as computed (fp32), plus the head and activations: a few
    # layers' worth at most, and a small part of the 1 GB model.
    assert grown < 4 * layer_fp32, (grown, layer_fp32)
    assert grown < 0.5 * total, (grown, total)
