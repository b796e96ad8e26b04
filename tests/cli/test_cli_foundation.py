"""`emo-serve demo-model` and `emo-serve subset create|export|materialize`, run as a user would:
through `main([...])` in-process, and once through the installed console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emo_serve.checkpoint import Checkpoint
from emo_serve.cli import main
from emo_serve.demo import write_demo_checkpoint
from emo_serve.subset import SubsetSpec

EMO_SERVE = Path(sys.executable).with_name("emo-serve")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_fast_to_import() -> None:
    """`emo-serve --help` must not import torch, vLLM or the server stack."""
    code = ("import sys\nfrom emo_serve.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'vllm', 'fastapi', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "demo-model" in out and "subset" in out
    assert out.strip().endswith("[]")


def test_demo_model_flags_override_the_preset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "custom"
    code, stdout, _ = run_cli(capsys, "demo-model", str(out), "--layers", "2", "--experts", "8", "--shared", "2",
                              "--top-k", "3", "--hidden", "128", "--heads", "2", "--intermediate", "32",
                              "--vocab", "600", "--shards", "3", "--dtype", "bfloat16", "--seed", "5")
    assert code == 0 and stdout.strip() == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_shared_experts"], cfg["num_experts_per_tok"],
            cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["vocab_size"],
            cfg["torch_dtype"]) == (2, 8, 2, 3, 128, 2, 32, 600, "bfloat16")
    assert cfg["model_type"] == "emo" and cfg["architectures"] == ["EmoForCausalLM"]
    assert len(list(out.glob("model-0000?-of-00003.safetensors"))) == 3
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok["chat_template"]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() <= 600
    assert tokenizer.decode(tokenizer.encode("def f(x): return x + 1").ids) == "def f(x): return x + 1"
    ckpt = Checkpoint(out)
    assert ckpt.tensors["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (128, 32)
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == "BF16"
    # The same seed gives the same weights.
    again = write_demo_checkpoint(tmp_path / "again", "tiny", shards=1, seed=5, num_hidden_layers=2,
                                  num_experts=8, num_shared_experts=2, num_experts_per_tok=3, intermediate_size=32,
                                  vocab_size=600, torch_dtype="bfloat16")
    name = "model.layers.1.mlp.gate.weight"
    assert torch.equal(Checkpoint(again).read(name), ckpt.read(name))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shared", "20"], r"num_shared_experts 20 is not in 0\.\.num_experts \(16\)"),
        (["--heads", "3"], r"hidden_size is not divisible by num_attention_heads"),
        (["--top-k", "20"], r"num_experts_per_tok 20 exceeds num_experts 16"),
        (["--shared", "5"], r"layer 0: top-k 4 is smaller than the 5 shared experts"),
    ],
)
def test_demo_model_bad_flags_exit_2_and_write_nothing(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, "demo-model", str(tmp_path / "m"), *argv)
    assert code == 2 and err.startswith("emo-serve demo-model: error:")
    assert re.search(message, err), err
    assert os.listdir(tmp_path) == []


def test_demo_model_refuses_an_existing_directory(tmp_path: Path, capsys) -> None:
    (tmp_path / "m").mkdir()
    code, _, err = run_cli(capsys, "demo-model", str(tmp_path / "m"))
    assert code == 2 and "m: already exists" in err
    assert os.listdir(tmp_path / "m") == []


@pytest.mark.parametrize("bad", [["--top-k", "0"], ["--shards", "x"], ["--dtype", "int8"], ["--preset", "big"]])
def test_demo_model_argument_errors(tmp_path: Path, capsys, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo-model", str(tmp_path / "m"), *bad])
    assert info.value.code == 2 and not (tmp_path / "m").exists()


def test_subset_create_explicit_file_and_random(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    base = Checkpoint(tiny_ckpt)
    out = tmp_path / "deep" / "er" / "a.json"
    code, stdout, _ = run_cli(capsys, "subset", "create", "--base", str(tiny_ckpt), "--experts", "4, 1,9",
                              "--name", "explicit", "-o", str(out))
    assert code == 0 and stdout.strip() == str(out)
    spec = SubsetSpec.load(out)
    assert spec.experts == [[1, 4, 9, 15]] * 4 and spec.name == "explicit"
    assert spec.base.fingerprint == base.fingerprint and spec.base.location == str(tiny_ckpt)

    per_layer = tmp_path / "layers.json"
    per_layer.write_text(json.dumps([[0], [1, 2], [3, 15], [14, 13, 12]]))
    code, _, _ = run_cli(capsys, "subset", "create", "--base", str(tiny_ckpt), "--experts-file", str(per_layer),
                         "--name", "file", "-o", str(tmp_path / "b.json"))
    assert code == 0
    assert SubsetSpec.load(tmp_path / "b.json").experts == [[0, 15], [1, 2, 15], [3, 15], [12, 13, 14, 15]]

    experts = []
    for name in ("r1", "r2"):
        assert run_cli(capsys, "subset", "create", "--base", str(tiny_ckpt), "--random", "3", "--seed", "7",
                       "--name", name, "-o", str(tmp_path / f"{name}.json"))[0] == 0
        spec = SubsetSpec.load(tmp_path / f"{name}.json")
        assert spec.provenance.method == "random" and spec.provenance.seed == 7
        experts.append(spec.experts)
    assert experts[0] == experts[1] and all(len(e) == 4 for e in experts[0])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        (["--experts", "1,x"], r"--experts '1,x': expected comma-separated integers"),
        (["--experts", "1,1"], r"layer 0: duplicate expert ids \[1\]"),
        (["--experts", "99"], r"layer 0: expert ids \[99\] out of range 0\.\.15"),
        (["--experts", "15"], r"layer 0: keeps no routed expert"),
        (["--random", "16"], r"--random 16: layer 0 has 15 routed experts"),
        (["--experts-file", "{missing}"], r"missing\.json: cannot read"),
        (["--experts-file", "{not-json}"], r"not-json\.json: not valid JSON"),
        (["--experts-file", "{flat}"], r"flat\.json: expected a JSON list of per-layer lists"),
        (["--experts-file", "{three}"], r"expert lists for 3 layers, the base has 4"),
        (["--experts", "1", "--name", "../../etc/x"], r"invalid subset name '\.\./\.\./etc/x'"),
        (["--experts", "1", "--name", "a/b"], r"invalid subset name 'a/b'"),
    ],
)
def test_subset_create_bad_input(tiny_ckpt: Path, tmp_path: Path, capsys, how: list[str], message: str) -> None:
    files = {"missing": "", "not-json": "[[1],", "flat": "[1, 2, 3]", "three": "[[1], [2], [3]]"}
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, text in files.items():
        if text:
            (inputs / f"{name}.json").write_text(text)
    how = [a.format(**{k: inputs / f"{k}.json" for k in files}) for a in how]
    if "--name" not in how:
        how += ["--name", "s"]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "subset", "create", "--base", str(tiny_ckpt), *how, "-o", str(out / "s.json"))
    assert code == 2 and err.startswith("emo-serve subset: error:") and re.search(message, err), err
    assert not out.exists()


def test_subset_create_needs_exactly_one_way(tiny_ckpt: Path, tmp_path: Path) -> None:
    for extra in ([], ["--experts", "1", "--random", "2"]):
        with pytest.raises(SystemExit) as info:
            main(["subset", "create", "--base", str(tiny_ckpt), "--name", "s", "-o", str(tmp_path / "s.json"), *extra])
        assert info.value.code == 2
    assert os.listdir(tmp_path) == []


def test_export_and_materialize_through_the_console_script(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.json"
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def emo_serve(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(EMO_SERVE), *argv], capture_output=True, text=True, env=env, timeout=300)

    assert main(["subset", "create", "--base", str(tiny_ckpt), "--random", "2", "--name", "cli",
                 "-o", str(manifest)]) == 0
    done = emo_serve("subset", "export", str(manifest), str(tmp_path / "exported"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "exported")
    sub = Checkpoint(tmp_path / "exported")
    assert sub.config.experts_per_layer == [3] * 4
    done = emo_serve("subset", "materialize", str(manifest), str(tmp_path / "mat"))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "mat")) == sorted(["config.json", "subset.json", "tokenizer.json",
                                                          "tokenizer_config.json", "generation_config.json"])
    assert main(["subset", "export", str(manifest), str(tmp_path / "exported")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_base_override_and_fingerprint_mismatch(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.json"
    assert run_cli(capsys, "subset", "create", "--base", str(tiny_ckpt), "--experts", "3,5", "--name", "moved",
                   "-o", str(manifest))[0] == 0
    moved = Path(shutil.copytree(tiny_ckpt, tmp_path / "moved-base"))
    code, _, _ = run_cli(capsys, "subset", "materialize", str(manifest), str(tmp_path / "mat"), "--base", str(moved))
    assert code == 0
    assert SubsetSpec.load(tmp_path / "mat" / "subset.json").base.location == str(moved)  # what was checked

    other = write_demo_checkpoint(tmp_path / "other", "tiny", seed=9)
    for command in ("export", "materialize"):
        code, _, err = run_cli(capsys, "subset", command, str(manifest), str(tmp_path / "x"), "--base", str(other))
        assert code == 2 and "subset 'moved' was made for a checkpoint with fingerprint" in err
        assert not (tmp_path / "x").exists()

    data = json.loads(manifest.read_text())
    data["base"]["location"] = str(tmp_path / "gone")
    manifest.write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "subset", "export", str(manifest), str(tmp_path / "x"))
    assert code == 2 and f"{tmp_path / 'gone'}/config.json: file not found" in err
    assert sorted(os.listdir(tmp_path)) == ["m.json", "mat", "moved-base", "other"]
