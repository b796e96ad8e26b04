"""Opening checkpoints from every kind of location and reading tensors by byte range."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import safetensors.torch
import torch

from emo_serve.checkpoint import (
    INDEX_FILE,
    Checkpoint,
    coalesce,
    resolve_location,
)
from emo_serve.schema import expert_tensor_names, layer_tensor_names
from emo_serve.demo import write_demo_checkpoint


def library_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor, read by the `safetensors` library itself."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt_dir.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(shard))
    return out


@pytest.fixture(scope="module")
def expected(tiny_ckpt: Path) -> dict[str, torch.Tensor]:
    return library_tensors(tiny_ckpt)


@pytest.fixture
def memory_ckpt(tiny_ckpt: Path):
    fs = fsspec.filesystem("memory")
    root = f"/ckpt-{uuid.uuid4().hex}"
    for p in tiny_ckpt.iterdir():
        fs.pipe(f"{root}/{p.name}", p.read_bytes())
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_every_tensor_equals_the_library_read(tiny_ckpt: Path, expected) -> None:
    ckpt = Checkpoint(tiny_ckpt)
    assert set(ckpt.tensors) == set(expected) == set(ckpt.expected_tensor_names())
    got = dict(ckpt.read_many(list(expected)))
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert ckpt.stats.bytes_read == ckpt.total_tensor_bytes == sum(t.nbytes for t in expected.values())


@pytest.mark.parametrize("kind", ["path", "file-url", "memory", "http"])
def test_locations_agree(kind: str, tiny_ckpt: Path, memory_ckpt: str, range_server, expected) -> None:
    if kind == "path":
        location = str(tiny_ckpt)
    elif kind == "file-url":
        location = tiny_ckpt.as_uri()
    elif kind == "memory":
        location = memory_ckpt
    else:
        dest = range_server.root / f"loc-{uuid.uuid4().hex[:8]}"
        shutil.copytree(tiny_ckpt, dest)
        location = range_server.url(dest.name)
    ckpt = Checkpoint(location)
    assert ckpt.fingerprint == Checkpoint(tiny_ckpt).fingerprint
    assert ckpt.tensors.keys() == expected.keys()
    names = layer_tensor_names(ckpt.config, 2)
    for name, t in ckpt.read_many(names):
        assert torch.equal(t, expected[name]), name
    assert ckpt.stats.bytes_read == sum(expected[n].nbytes for n in names)
    assert json.loads(ckpt.read_file("tokenizer_config.json"))["chat_template"]


def settled(range_server, n_requests: int) -> None:
    """The fixture server records a request just after sending its body, so the client can be
    ahead of the count by a moment; wait for it to catch up."""
    deadline = time.monotonic() + 5
    while len(range_server.requests) < n_requests and time.monotonic() < deadline:
        time.sleep(0.01)


def test_headers_only_at_open_over_http(tiny_ckpt: Path, range_server) -> None:
    dest = range_server.root / f"open-{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_ckpt, dest)
    range_server.reset()
    ckpt = Checkpoint(range_server.url(dest.name))
    settled(range_server, 6)  # 4 GETs, a HEAD per shard for its size
    gets = sorted(r[1].rsplit("/", 1)[1] for r in range_server.requests if r[0] == "GET")
    # config, index (once), one speculative header read per shard (headers are < 100 kB)
    assert gets == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json"]
    assert range_server.bytes_served == ckpt.header_bytes < 0.02 * ckpt.total_tensor_bytes
    assert ckpt.stats.bytes_read == 0
    ckpt.fingerprint  # noqa: B018 -- one 4 kB sample of the embedding, counted as metadata
    settled(range_server, 7)
    assert range_server.bytes_served == ckpt.header_bytes
    assert range_server.requests[-1][2] == f"bytes={ckpt.tensors['model.embed_tokens.weight'].start}-" \
                                           f"{ckpt.tensors['model.embed_tokens.weight'].start + 4095}"


def test_large_header_takes_a_second_read(tmp_path: Path) -> None:
    """A header past the 100 kB speculative read (e.g. a shard of 128 experts x 16 layers)."""
    ckpt_dir = write_demo_checkpoint(tmp_path / "many", "tiny", shards=1, num_experts=256,
                                     num_experts_per_tok=8, hidden_size=64, num_attention_heads=1,
                                     intermediate_size=8, vocab_size=512)
    ckpt = Checkpoint(ckpt_dir)
    (shard,) = ckpt_dir.glob("*.safetensors")
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    assert header_len > 100_000
    assert ckpt.header_bytes >= 8 + header_len
    assert len(ckpt.tensors) == len(ckpt.expected_tensor_names())


def test_single_file_checkpoint(tiny_ckpt: Path, tmp_path: Path, expected) -> None:
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tiny_ckpt / "config.json", single)
    safetensors.torch.save_file(expected, single / "model.safetensors")
    ckpt = Checkpoint(single)
    assert not (single / INDEX_FILE).exists()
    assert ckpt.fingerprint == Checkpoint(tiny_ckpt).fingerprint
    name = "model.layers.3.mlp.experts.15.down_proj.weight"
    assert torch.equal(ckpt.read(name), expected[name])


def test_read_many_coalesces_adjacent_tensors(tiny_ckpt: Path) -> None:
    ckpt = Checkpoint(tiny_ckpt)
    # All experts of one layer are contiguous in one shard: one request for 48 tensors.
    layer = 0
    names = [n for e in range(16) for n in expert_tensor_names(layer, e)]
    shards = {ckpt.tensors[n].shard for n in names}
    got = [name for name, _ in ckpt.read_many(names[::-1])]
    assert got == sorted(names, key=lambda n: (ckpt.tensors[n].shard, ckpt.tensors[n].start))
    assert ckpt.stats.requests == len(shards)
    # Every other expert: one request per expert and shard (its 3 tensors are adjacent).
    ckpt2 = Checkpoint(tiny_ckpt)
    names = [n for e in range(0, 16, 2) for n in expert_tensor_names(layer, e)]
    list(ckpt2.read_many(names))
    assert ckpt2.stats.requests == len({(n.split(".")[5], ckpt.tensors[n].shard) for n in names}) >= 8
    assert ckpt2.stats.bytes_read == sum(ckpt.tensors[n].nbytes for n in names)


def test_coalesce_caps_chunk_size(tiny_ckpt: Path) -> None:
    ckpt = Checkpoint(tiny_ckpt)
    infos = [ckpt.tensors[n] for e in range(16) for n in expert_tensor_names(1, e)]
    one = infos[0].nbytes
    chunks = coalesce(infos, max_chunk=3 * one)
    assert all(sum(i.nbytes for i in c) <= 3 * one for c in chunks)
    assert sum(len(c) for c in chunks) == len(infos)
    assert all(a.end == b.start for c in chunks for a, b in zip(c, c[1:]))


def test_unknown_tensor_name(tiny_ckpt: Path) -> None:
    from emo_serve.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"no tensor named 'model\.layers\.9\.mlp\.gate\.weight'"):
        Checkpoint(tiny_ckpt).read("model.layers.9.mlp.gate.weight")


def test_fingerprint_tells_checkpoints_apart(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = Checkpoint(tiny_ckpt).fingerprint
    # Same architecture, other weights (as Emo_1b14b vs StdMoE_1b14b): different.
    other_seed = write_demo_checkpoint(tmp_path / "seed1", "tiny", seed=1)
    assert Checkpoint(other_seed).fingerprint != base
    # Metadata that does not change the model (auto_map, versions): same.
    same = Path(shutil.copytree(tiny_ckpt, tmp_path / "same"))
    cfg = json.loads((same / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "elsewhere.EmoConfig"}
    cfg["transformers_version"] = "9.9"
    (same / "config.json").write_text(json.dumps(cfg))
    assert Checkpoint(same).fingerprint == base
    # A model-defining key: different.
    cfg["rope_theta"] = 10000.0
    (same / "config.json").write_text(json.dumps(cfg))
    assert Checkpoint(same).fingerprint != base


def test_resolve_location(tmp_path: Path) -> None:
    assert resolve_location(tmp_path) == str(tmp_path)
    assert resolve_location("allenai/Emo_1b14b_1T") == "hf://allenai/Emo_1b14b_1T"
    assert resolve_location("http://h/x") == "http://h/x"
    assert resolve_location("/not/there") == "/not/there"


def test_unreachable_remote_locations_name_the_file(range_server) -> None:
    from emo_serve.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"^http://127\.0\.0\.1:\d+/no-such-ckpt/config\.json: file not found"):
        Checkpoint(range_server.url("no-such-ckpt"))
    # The Hub is unreachable here (HF_HUB_OFFLINE=1): a bare Hub id fails with a clear error too.
    with pytest.raises(CheckpointError, match=r"^hf://allenai/Emo_1b14b_1T/config\.json: cannot read"):
        Checkpoint("allenai/Emo_1b14b_1T")
