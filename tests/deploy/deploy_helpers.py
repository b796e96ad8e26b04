"""What the deployment tests read: the repository's deployment files, the tools that check them
(command-line tools from the `test` extra), and the real options of `emo-serve serve`.

No container engine or cluster exists here, so the files are checked statically, and the
settings a container would start with are built by the server's own CLI parser and `Settings`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
DEPLOY = REPO / "deploy"
K8S_BASE = DEPLOY / "kubernetes" / "base"
K8S_PER_TASK = DEPLOY / "kubernetes" / "overlays" / "per-task-subset"
K8S_FLEET = DEPLOY / "kubernetes" / "overlays" / "fleet"
ROUTER_DOCKERFILE = DEPLOY / "router" / "Dockerfile"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

EMO_VARIABLE = re.compile(r"\bEMO_[A-Z0-9_]*[A-Z0-9]\b")


def tool(name: str) -> str:
    """A command-line tool of the `test` extra: the virtualenv's copy first, then PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is missing: `bash scripts/install.sh test` installs it "
                    "(pyproject.toml, `test` extra)")
    return found


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, **kwargs)


def serve_parser() -> argparse.ArgumentParser:
    """The real parser of `emo-serve serve`, as `emo-serve` builds it."""
    from emo_serve.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise AssertionError("`emo-serve` has no `serve` command")


def serve_option_dests() -> set[str]:
    """Destinations of the `emo-serve serve` flags (`--kv-cache-gb` -> `kv_cache_gb`)."""
    return {a.dest for a in serve_parser()._actions if a.option_strings and a.dest != "help"}


def settings_for(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str], argv: Sequence[str] = ()) -> Any:
    """The `Settings` that `emo-serve serve ARGV` builds in a process whose environment holds
    exactly `env` among the EMO_* variables (what a container gets from its image, compose file
    or pod spec). Raises pydantic's ValidationError where the server would refuse to start."""
    from emo_serve.cli.serve import settings_from_args

    for name in list(os.environ):
        if name.startswith("EMO_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings_from_args(serve_parser().parse_args(list(argv)))


def image_env() -> dict[str, str]:
    """ENV of the image's final stage (the runtime defaults every container starts from)."""
    from dockerfile_parse import DockerfileParser

    return dict(DockerfileParser(str(DOCKERFILE)).envs)


def env_file(path: Path) -> dict[str, str]:
    """A KEY=VALUE file (compose env_file, kustomize envs) without its comments."""
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH`: the rendered resources. Warnings (deprecated fields) fail too."""
    result = run([tool("kubectl"), "kustomize", str(path)])
    assert result.returncode == 0 and not result.stderr.strip(), (
        f"kubectl kustomize {path.relative_to(REPO)} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(resources: Sequence[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def pod_env(deployment: dict[str, Any], config_maps: Mapping[str, dict[str, Any]],
            secrets: Mapping[str, str], fields: Mapping[str, str] | None = None) -> dict[str, str]:
    """The EMO_* (and other) variables the Deployment's container starts with: its ConfigMap
    `envFrom`s, then its `env` entries; a Secret key reads `secrets[key]` (absent optional keys
    are skipped, as Kubernetes does), a downward-API field reads `fields[fieldPath]`
    (`metadata.name`: the pod's name)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        if "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = (fields or {})[entry["valueFrom"]["fieldRef"]["fieldPath"]]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        if ref["key"] in secrets:
            env[entry["name"]] = secrets[ref["key"]]
        else:
            assert ref.get("optional"), f"{entry['name']}: required Secret key {ref['key']!r} not given"
    return env

