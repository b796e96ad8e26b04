"""`emo-serve eval` and the auto-sizing flags of `emo-serve profile`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_serve.cli import main
from emo_serve.subset import SubsetSpec


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("examples") / "ex.jsonl"
    rows = [{"text": "def add(a, b):\n    return a + b\n"}, {"text": "12 + 7 = 19. 3 * 4 = 12."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_prints_a_table_and_writes_the_report(tiny_ckpt: Path, examples_file: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    subset = tmp_path / "r4.json"
    assert main(["subset", "create", "--base", str(tiny_ckpt), "--random", "4", "--name", "r4",
                 "-o", str(subset)]) == 0
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert main(["eval", "--base", str(tiny_ckpt), "--subset", str(subset), "--examples", str(examples_file),
                 "-o", str(report), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["model", "routed/layer", "ppl"]
    assert any(line.startswith("r4 ") for line in table.splitlines())
    data = json.loads(report.read_text())
    assert data["format"] == "emo-eval/v1" and [s["name"] for s in data["subsets"]] == ["r4"]
    assert data["subsets"][0]["routed_experts"] == [4, 4, 4, 4]


def test_eval_refuses_a_subset_of_another_base(tiny_ckpt: Path, examples_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from emo_serve.demo import write_demo_checkpoint

    other = write_demo_checkpoint(tmp_path / "other", "tiny", seed=9)
    subset = tmp_path / "foreign.json"
    assert main(["subset", "create", "--base", str(other), "--random", "4", "--name", "foreign",
                 "-o", str(subset)]) == 0
    assert main(["eval", "--base", str(tiny_ckpt), "--subset", str(subset), "--examples", str(examples_file),
                 "--quiet"]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_profile_sizes_itself_from_a_tolerance(planted: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, examples = planted
    ex = tmp_path / "planted.jsonl"
    ex.write_text("".join(json.dumps({"text": t}) + "\n" for t in examples))
    out = tmp_path / "auto.json"
    assert main(["profile", "--base", str(path), "--examples", str(ex), "--max-loss-increase", "0.001",
                 "--folds", "2", "--quiet", "-o", str(out)]) == 0
    spec = SubsetSpec.load(out)
    assert spec.provenance.size == 3
    quality = spec.provenance.details["quality"]
    assert quality["estimate"] == "k-fold" and quality["folds"] == 2 and quality["max_loss_increase"] == 0.001


@pytest.mark.parametrize("flags", [["--size", "4", "--budget", "8"], ["--max-loss-increase", "-1"],
                                   ["--budget", "0"]])
def test_profile_size_flags_are_checked(tiny_ckpt: Path, examples_file: Path, tmp_path: Path,
                                        flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--base", str(tiny_ckpt), "--examples", str(examples_file), *flags,
              "-o", str(tmp_path / "x.json")])
    assert exc.value.code == 2
