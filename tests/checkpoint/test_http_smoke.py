import shutil

from emo_serve.checkpoint import Checkpoint
from emo_serve.stream import iter_subset_tensors, plan_subset
from emo_serve.subset import random_subset


def test_http_subset_stream_reads_only_subset_bytes(tiny_ckpt, range_server):
    shutil.copytree(tiny_ckpt, range_server.root / "tiny-smoke")
    base = Checkpoint(range_server.url("tiny-smoke"))
    spec = random_subset(base, 2, "smoke", seed=1)
    range_server.reset()
    tensors = dict(iter_subset_tensors(base, spec))
    expected = sum(t.nbytes for t in plan_subset(base, spec))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == expected
    assert range_server.bytes_served <= 1.02 * expected
    local = Checkpoint(tiny_ckpt)
    name = "model.layers.0.mlp.gate.weight"
    assert tensors[name].equal(local.read(name)[spec.experts[0]])
