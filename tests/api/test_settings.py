"""`Settings`: environment parsing, flag-over-env precedence, unsafe binds refused, the embedded
default model, and the CLI exposing every setting as a flag."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from emo_serve.cli.serve import add_arguments, settings_from_args
from emo_serve.default_model import resolve_default_model
from emo_serve.settings import Settings, default_state_dir, derive_model_id

from api_harness import CLI

FLAG_FOR_FIELD = {"preload_subsets": "--preload-subset", "engine_args": "--engine-arg"}


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("EMO_"):
            monkeypatch.delenv(key)


def test_env_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMO_MAX_ENGINES", "3")
    monkeypatch.setenv("EMO_SERVE_BASE", "false")
    monkeypatch.setenv("EMO_PRELOAD_SUBSETS", "a.json, /m/b.json,")
    monkeypatch.setenv("EMO_API_KEY", "k")
    monkeypatch.setenv("EMO_KV_CACHE_GB", "0.5")
    monkeypatch.setenv("EMO_ENGINE_ARGS", "--max-num-seqs 8 --served-model-name 'a b'")
    monkeypatch.setenv("EMO_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert s.max_engines == 3 and s.serve_base is False and s.kv_cache_gb == 0.5
    assert s.preload_subsets == [Path("a.json"), Path("/m/b.json")]
    assert s.api_key is not None and s.api_key.get_secret_value() == "k"
    assert s.effective_admin_key == s.api_key  # the admin key defaults to the API key
    assert s.engine_args == ["--max-num-seqs", "8", "--served-model-name", "a b"]
    assert s.log_level == "debug"


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMO_MAX_ENGINES", "3")
    monkeypatch.setenv("EMO_PORT", "9000")
    monkeypatch.setenv("EMO_SERVE_BASE", "false")
    s = settings_from_args(parse("--max-engines", "5", "--serve-base", "--preload-subset", "x.json",
                                 "--preload-subset", "y.json"))
    assert s.max_engines == 5 and s.serve_base is True and s.port == 9000  # port: env (no flag)
    assert s.preload_subsets == [Path("x.json"), Path("y.json")]


def test_empty_key_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMO_API_KEY", "")
    assert Settings().api_key is None


def test_bad_env_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMO_MAX_ENGINES", "0")
    with pytest.raises(ValidationError, match="max_engines"):
        Settings()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_non_loopback_bind_needs_an_admin_key(host: str) -> None:
    with pytest.raises(ValidationError, match="admin key"):
        Settings(host=host)
    assert Settings(host=host, admin_key="a").effective_admin_key is not None
    assert Settings(host=host, api_key="k").effective_admin_key is not None
    assert Settings(host=host, allow_insecure_admin=True).effective_admin_key is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"])
def test_loopback_bind_needs_no_key(host: str) -> None:
    assert Settings(host=host).host == host


def test_served_model_name_cannot_be_a_path() -> None:
    for bad in ("../x", "a/b", ".hidden", "a..b", ""):
        with pytest.raises(ValidationError):
            Settings(served_model_name=bad)


def test_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "emo-serve"
    assert Settings().state_dir == tmp_path / "emo-serve"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_state_dir() == Path.home() / ".local" / "share" / "emo-serve"


def test_shipped_default_model_wins(tmp_path: Path) -> None:
    from emo_serve import default_model

    shipped = default_model.shipped_default_model()
    if shipped is None:
        pytest.skip("this build ships no trained demo model")
    assert resolve_default_model(tmp_path) == shipped and (shipped / "config.json").is_file()
    assert not (tmp_path / "models").exists()  # nothing generated


def test_default_model_is_generated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from emo_serve import default_model

    monkeypatch.setattr(default_model, "shipped_default_model", lambda: None)  # as in a build without it
    first = resolve_default_model(tmp_path)
    assert first == tmp_path / "models" / "emo-demo" and (first / "config.json").is_file()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_default_model(tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("location, expected", [
    ("/data/models/Emo_1b14b_1T", "Emo_1b14b_1T"), ("allenai/Emo_1b14b_1T", "Emo_1b14b_1T"),
    ("hf://allenai/Emo_1b14b_1T/", "Emo_1b14b_1T"), ("http://host/a b/m@x", "m-x"), ("/", "base")])
def test_model_id_from_location(location: str, expected: str) -> None:
    assert derive_model_id(location) == expected


def test_every_setting_has_a_flag() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = {s for a in p._actions for s in a.option_strings}
    for field in Settings.model_fields:
        flag = FLAG_FOR_FIELD.get(field, "--" + field.replace("_", "-"))
        assert flag in flags, f"Settings.{field} has no flag {flag}"


def test_cli_refuses_insecure_bind(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "serve", "--host", "0.0.0.0", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "host '0.0.0.0' is not a loopback address" in r.stderr and "--admin-key" in r.stderr


def test_cli_refuses_bad_preload_manifest(tmp_path: Path, tiny_ckpt: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "../x"}')
    r = subprocess.run([*CLI, "serve", "--model", str(tiny_ckpt), "--state-dir", str(tmp_path / "s"),
                        "--preload-subset", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "bad.json" in r.stderr
