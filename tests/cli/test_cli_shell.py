"""The command-line shell itself: `--help` loads no model stack, `serve`'s flags come from
`Settings`, broken command modules fail loudly, and only typed input errors exit with 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from emo_serve import cli
from emo_serve.cli import build_parser, main
from emo_serve.errors import SubsetError
from emo_serve.settings import Settings

HEAVY = ("torch", "vllm", "fastapi", "uvicorn", "transformers")


def loaded_after(code: str) -> list[str]:
    """Heavy modules a fresh interpreter holds after running `code`."""
    probe = f"import sys\n{code}\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [m for m in r.stdout.splitlines()[-1].removeprefix("loaded:").split(",") if m]


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["profile", "--help"], ["subset", "--help"]])
def test_help_loads_no_model_stack(argv: list[str]) -> None:
    code = f"from emo_serve.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert loaded_after(code) == []


def test_what_the_api_protocol_uses_needs_no_torch() -> None:
    assert loaded_after("import emo_serve.methods, emo_serve.names, emo_serve.errors, emo_serve.settings") == []


def test_no_api_module_imports_torch_at_module_level() -> None:
    import ast
    from pathlib import Path

    import emo_serve.api

    for path in Path(emo_serve.api.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path


def serve_parser() -> argparse.ArgumentParser:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise AssertionError("no serve command")


def test_serve_help_names_each_env_variable_and_choice() -> None:
    actions = {a.dest: a for a in serve_parser()._actions if a.option_strings and a.dest != "help"}
    assert set(actions) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert f"EMO_{name.upper()}" in (actions[name].help or ""), name
        assert field.description and field.description in (actions[name].help or "")
    assert "half" in (actions["dtype"].metavar or "") and "cuda" in (actions["device"].metavar or "")
    assert "default 8000" in (actions["port"].help or "")


def test_serve_refuses_bad_values_with_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-engines", "0"]) == 2
    assert "--max-engines / EMO_MAX_ENGINES" in capsys.readouterr().err


def test_a_broken_command_module_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "no_such_command"))
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        build_parser()


def test_only_typed_input_errors_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                        tmp_path) -> None:
    from emo_serve.cli import demo

    def bad_input(args: argparse.Namespace) -> int:
        raise SubsetError("layer 3: no good")

    monkeypatch.setattr(demo, "run", bad_input)
    assert main(["demo-model", str(tmp_path / "x")]) == 2
    assert "emo-serve demo-model: error: layer 3: no good" in capsys.readouterr().err

    def bug(args: argparse.Namespace) -> int:
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(demo, "run", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["demo-model", str(tmp_path / "x")])


def test_a_manifest_that_is_not_text_exits_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "binary.json"
    bad.write_bytes(b"\xff\xfe{not text")
    assert main(["subset", "export", str(bad), str(tmp_path / "out")]) == 2
    assert "binary.json" in capsys.readouterr().err
