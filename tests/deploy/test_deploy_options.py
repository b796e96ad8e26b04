"""Every EMO_* variable the deployment files use is a real option of `emo-serve serve`: a field of
the server's `Settings` (env prefix EMO_) and a flag of its CLI parser. A misspelt variable
would otherwise be ignored silently by the server (unknown environment variables are)."""

from __future__ import annotations

from pathlib import Path

from deploy_helpers import (COMPOSE_FILE, DEPLOY, DEPLOYMENT_DOC, DOCKERFILE, EMO_VARIABLE, REPO,
                            serve_option_dests)

DEPLOYMENT_FILES = [DOCKERFILE, COMPOSE_FILE, REPO / ".env", DEPLOYMENT_DOC,
                    *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]


def variables_in(paths: list[Path]) -> dict[str, set[str]]:
    """EMO_* name -> the files (relative) that use it."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for name in EMO_VARIABLE.findall(path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_emo_variable_is_a_serve_option() -> None:
    from emo_serve.settings import Settings

    assert Settings.model_config["env_prefix"] == "EMO_"
    fields, flags = set(Settings.model_fields), serve_option_dests()
    used = variables_in(DEPLOYMENT_FILES)
    unknown = {name: sorted(files) for name, files in used.items()
               if name.removeprefix("EMO_").lower() not in fields & flags}
    assert not unknown, f"not options of `emo-serve serve`: {unknown}"


def test_the_scan_sees_the_variables_the_files_rely_on() -> None:
    """Guards the test above against scanning nothing (a moved file, a broken pattern)."""
    used = variables_in(DEPLOYMENT_FILES)
    assert {"EMO_HOST", "EMO_PORT", "EMO_STATE_DIR", "EMO_API_KEY", "EMO_ADMIN_KEY",
            "EMO_ALLOW_INSECURE_ADMIN", "EMO_MODEL", "EMO_MAX_ENGINES", "EMO_KV_CACHE_GB",
            "EMO_PRELOAD_SUBSETS", "EMO_SERVE_BASE", "EMO_TENSOR_PARALLEL_SIZE"} <= set(used)
    assert str(DOCKERFILE.relative_to(REPO)) in used["EMO_HOST"]
    assert any(f.startswith("deploy/kubernetes/") for f in used["EMO_PRELOAD_SUBSETS"])
    assert not EMO_VARIABLE.findall("EMO_* EMO_ emo_host")
