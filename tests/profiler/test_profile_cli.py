"""`emo-serve profile`, `emo-serve subset plot` and `emo-serve subset union`, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_serve.cli import main
from emo_serve.subset import SubsetSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"text": "for i in range(10):\n    print(i * i)"},
        {"messages": [{"role": "user", "content": "sum a list"}, {"role": "assistant", "content": "sum(xs)"}]},
    ]) + "\n")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_profile_writes_subset_scores_and_plot(capsys, tiny_ckpt, examples, tmp_path):
    out, scores, plot = tmp_path / "s.json", tmp_path / "scores.json", tmp_path / "s.png"
    rc, stdout, _ = run(capsys, "profile", "--base", tiny_ckpt, "--examples", examples, "--size", 3,
                        "--method", "frequency", "-o", out, "--scores", scores, "--plot", plot, "--quiet")
    assert rc == 0 and stdout.strip() == str(out)
    spec = SubsetSpec.load(out)
    assert spec.name == "code-frequency" and all(len(ids) == 4 for ids in spec.experts)
    assert spec.provenance.method == "frequency" and len(spec.provenance.example_fingerprints) == 2
    data = json.loads(scores.read_text())
    assert data["format"] == "emo-scores/v1" and len(data["scores"]) == 4 and len(data["scores"][0]) == 16
    width, height = png_size(plot)
    assert width > 300 and height > 200


def test_profile_fraction_layerwise_and_truncation_warning(capsys, caplog, tiny_ckpt, examples, tmp_path):
    out = tmp_path / "lw.json"
    rc, _, _ = run(capsys, "profile", "--base", tiny_ckpt, "--examples", examples, "--fraction", 0.25,
                     "--method", "layerwise", "--max-tokens-per-example", 4, "--name", "lw", "-o", out)
    assert rc == 0
    spec = SubsetSpec.load(out)
    assert spec.provenance.fraction == 0.25 and spec.provenance.size == 4
    assert len(spec.provenance.details["warnings"]) == 2
    assert "truncated to 4" in caplog.text  # also logged for the user


@pytest.mark.parametrize("extra, message", [
    (["--size", 16], "layer 0 has 15 routed experts, keep 1..15 (got 16)"),
    (["--size", 0], "0 must be >= 1"),
    (["--fraction", 1.5], "must be in (0, 1]"),
    (["--size", 2, "--fraction", 0.5], "not allowed with argument"),
    (["--size", 2, "--method", "magic"], "invalid choice: 'magic'"),
    (["--size", 2, "--name", "../x"], "invalid subset name"),
    (["--size", 2, "--device", "cuda"], "CUDA is not available"),
    ([], "one of the arguments --size --fraction"),
])
def test_profile_bad_arguments_exit_2(capsys, tiny_ckpt, examples, tmp_path, extra, message):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["profile", "--base", tiny_ckpt, "--examples", examples, "-o", tmp_path / "x.json", *extra]
    try:
        rc, _, err = run(capsys, *argv)
    except SystemExit as exc:  # argparse's own errors
        rc, err = exc.code, capsys.readouterr().err
    assert rc == 2 and message in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("content, message", [
    ("", "no examples"),
    ('{"text": ""}\n', "code.jsonl:1.text: empty example"),
    ('{"text": "fine"}\n{"txt": "typo"}\n', "code.jsonl:2: needs exactly one of 'text' or 'messages'"),
])
def test_profile_bad_examples_exit_2(capsys, tiny_ckpt, tmp_path, content, message):
    path = tmp_path / "code.jsonl"
    path.write_text(content)
    rc, _, err = run(capsys, "profile", "--base", tiny_ckpt, "--examples", path, "--size", 2, "-o", tmp_path / "x.json")
    assert rc == 2 and message in err


def test_union_and_plot(capsys, tiny_ckpt, examples, tmp_path):
    a, b, scores = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "scores.json"
    prose = tmp_path / "prose.txt"
    prose.write_text("The river ran quietly past the old mill.\n\nBirds sang in the tall trees.\n")
    assert run(capsys, "profile", "--base", tiny_ckpt, "--examples", examples, "--size", 2, "-o", a,
               "--scores", scores, "--quiet")[0] == 0
    assert run(capsys, "profile", "--base", tiny_ckpt, "--examples", prose, "--size", 2, "-o", b, "--quiet")[0] == 0
    u = tmp_path / "u.json"
    rc, stdout, _ = run(capsys, "subset", "union", a, b, "--name", "both", "-o", u)
    assert rc == 0 and stdout.strip() == str(u)
    sa, sb, su = SubsetSpec.load(a), SubsetSpec.load(b), SubsetSpec.load(u)
    assert su.experts == [sorted(set(x) | set(y)) for x, y in zip(sa.experts, sb.experts)]
    assert su.experts != sa.experts  # the two domains chose differently somewhere
    assert su.base == sa.base and su.provenance.details["parts"] == [sa.name, sb.name]
    assert su.provenance.example_fingerprints == sa.provenance.example_fingerprints + sb.provenance.example_fingerprints

    for argv in ([u, tmp_path / "u.png"], [a, tmp_path / "a.png", "--scores", scores],
                 [scores, tmp_path / "sc.png"], [scores, tmp_path / "sc3.png", "--size", 3]):
        rc, stdout, _ = run(capsys, "subset", "plot", *argv)
        assert rc == 0 and stdout.strip() == str(argv[1])
        png_size(argv[1])


def test_union_refuses_different_bases(capsys, tiny_ckpt, tmp_path):
    from emo_serve.demo import write_demo_checkpoint

    other = write_demo_checkpoint(tmp_path / "other", "tiny", seed=5)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run(capsys, "subset", "create", "--base", tiny_ckpt, "--random", 2, "--name", "a", "-o", a)[0] == 0
    assert run(capsys, "subset", "create", "--base", other, "--random", 2, "--name", "b", "-o", b)[0] == 0
    rc, _, err = run(capsys, "subset", "union", a, b, "--name", "ab", "-o", tmp_path / "ab.json")
    assert rc == 2 and "different bases" in err
    assert not (tmp_path / "ab.json").exists()


def test_plot_bad_input(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    rc, _, err = run(capsys, "subset", "plot", bad, tmp_path / "x.png")
    assert rc == 2 and "bad.json" in err


def test_cli_method_list_matches_the_library():
    from emo_serve.cli.profile import METHODS as CLI_METHODS
    from emo_serve.profiler import METHODS

    assert CLI_METHODS == METHODS
