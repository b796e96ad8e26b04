"""Bad checkpoints: each gets a typed error naming the file and tensor, the CLI exits 2, and
nothing is left half-written. The damage is real (files deleted, truncated, headers rewritten)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.cli import main
from emo_serve.errors import CheckpointError, ConfigError
from emo_serve.subset import random_subset

from ckpt_damage import INDEX, SHARD1, SHARD2, edit_header, edit_json, last_tensor, read_header

EXPERT = "model.layers.0.mlp.experts.2.up_proj.weight"  # lives in shard 1 of the tiny preset


def truncate(path: Path, drop: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - drop)


def offsets_past_end(d: Path) -> None:
    def edit(h: dict) -> None:
        begin, end = h[EXPERT]["data_offsets"]
        size = (d / SHARD1).stat().st_size
        h[EXPERT]["data_offsets"] = [size, size + end - begin]

    edit_header(d / SHARD1, edit)


def unsupported_dtype(d: Path) -> None:
    edit_header(d / SHARD1, lambda h: h[EXPERT].update(dtype="U32"))  # same width as F32


def pickle_only(d: Path) -> None:
    for p in d.glob("model*"):
        p.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")


def reshaped_expert(d: Path) -> None:
    edit_header(d / SHARD1, lambda h: h[EXPERT].update(shape=[64, 256]))  # same bytes, not the config's shape


def garbage_header(d: Path) -> None:
    raw = bytearray((d / SHARD2).read_bytes())
    raw[8:20] = b"\xff" * 12
    (d / SHARD2).write_bytes(bytes(raw))


# (damage, error class, message pattern); every pattern names the file and, where there is one,
# the tensor.
CASES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "missing-config": (lambda d: (d / "config.json").unlink(), CheckpointError,
                       r"/config\.json: file not found"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{"), ConfigError,
                        r"/config\.json: not valid JSON"),
    "config-not-emo": (lambda d: edit_json(d / "config.json", lambda c: c.update(model_type="llama")),
                       ConfigError, r"/config\.json: model_type is 'llama', expected 'emo'"),
    "config-bad-top-k": (lambda d: edit_json(d / "config.json", lambda c: c.update(num_experts_per_tok=0)),
                         ConfigError, r"/config\.json: .*num_experts_per_tok must be >= 1"),
    "config-needs-missing-layer": (
        lambda d: edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=5)), CheckpointError,
        r"tensors the config requires are missing, first 'model\.layers\.4\.self_attn\.q_proj\.weight'"),
    "missing-shard": (lambda d: (d / SHARD2).unlink(), CheckpointError,
                      rf"/{SHARD2}: shard file not found"),
    "truncated-shard": (lambda d: truncate(d / SHARD2, 1000), CheckpointError,
                        rf"/{SHARD2}: tensor '{{last2}}': byte range \d+\.\.\d+ is out of bounds "
                        r"\(file has \d+ bytes; truncated shard\?\)"),
    "truncated-in-header": (lambda d: truncate(d / SHARD1, (d / SHARD1).stat().st_size - 100),
                            CheckpointError, rf"/{SHARD1}: header of \d+ bytes runs past the end"),
    "header-not-json": (garbage_header, CheckpointError, rf"/{SHARD2}: header is not valid JSON"),
    "offsets-out-of-bounds": (offsets_past_end, CheckpointError,
                              rf"/{SHARD1}: tensor '{re.escape(EXPERT)}': byte range .* out of bounds"),
    "index-names-missing-tensor": (
        lambda d: edit_json(d / INDEX, lambda i: i["weight_map"].update(
            {"model.layers.0.mlp.experts.99.up_proj.weight": SHARD1})), CheckpointError,
        rf"/{INDEX}: tensor 'model\.layers\.0\.mlp\.experts\.99\.up_proj\.weight' is mapped to {SHARD1}, "
        "whose header does not contain it"),
    "index-shard-outside-dir": (
        lambda d: edit_json(d / INDEX, lambda i: i["weight_map"].update({EXPERT: "../x.safetensors"})),
        CheckpointError, rf"/{INDEX}: invalid shard name '\.\./x\.safetensors'"),
    "unsupported-dtype": (unsupported_dtype, CheckpointError,
                          rf"/{SHARD1}: tensor '{re.escape(EXPERT)}': unsupported dtype 'U32'"),
    "wrong-shape": (reshaped_expert, CheckpointError,
                    rf"first '{re.escape(EXPERT)}' \(.*/{SHARD1}\): \[64, 256\], expected \[128, 128\]"),
    "pickle-only": (pickle_only, CheckpointError, r"only pickle-based weights \(pytorch_model\.bin\)"),
}


def damaged(ckpt_copy: Callable[[str], Path], case: str) -> tuple[Path, type[Exception], str]:
    damage, error, pattern = CASES[case]
    d = ckpt_copy(case)
    last2 = last_tensor(read_header(d / SHARD2)[0])
    damage(d)
    return d, error, pattern.replace("{last2}", re.escape(last2))


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_names_the_problem(ckpt_copy, case: str) -> None:
    d, error, pattern = damaged(ckpt_copy, case)
    with pytest.raises(error, match=pattern) as info:
        Checkpoint(d)
    assert str(d) in str(info.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_exits_2_and_writes_nothing(ckpt_copy, tiny_ckpt: Path, tmp_path: Path, capsys,
                                        case: str) -> None:
    manifest = tmp_path / "ok.json"
    random_subset(Checkpoint(tiny_ckpt), 3, "ok").save(manifest)
    d, _, pattern = damaged(ckpt_copy, case)
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))

    assert main(["subset", "create", "--base", str(d), "--random", "2", "--name", "x",
                 "-o", str(tmp_path / "new.json")]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    for command in ("export", "materialize"):
        assert main(["subset", command, str(manifest), str(out), "--base", str(d)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"emo-serve subset: error: ") and re.search(pattern, err), err
    assert set(os.listdir(tmp_path)) == before  # no manifest, no output dir, no temp dir


def test_shard_changed_after_open_fails_the_export_and_leaves_nothing(ckpt_copy, tmp_path: Path) -> None:
    d = ckpt_copy("changing")
    ckpt = Checkpoint(d)
    spec = random_subset(ckpt, 4, "s")
    truncate(d / SHARD2, 4096)  # e.g. a download still in progress, or a file being replaced
    from emo_serve.export import export_subset

    with pytest.raises(CheckpointError, match=rf"/{SHARD2}: read \d+ bytes at \d+, expected \d+ "
                                              r"\(file truncated or changed"):
        export_subset(ckpt, spec, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["changing"]


def test_missing_directory_and_unknown_location() -> None:
    with pytest.raises(CheckpointError, match=r"/no/such/dir/config\.json: file not found"):
        Checkpoint("/no/such/dir")
    with pytest.raises(CheckpointError, match=r"nosuchproto://x"):
        Checkpoint("nosuchproto://x")
