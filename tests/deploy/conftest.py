"""Fixtures of the deployment tests (see deploy_helpers.py for what they read and how)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy_helpers import COMPOSE_FILE, K8S_BASE, K8S_FLEET, K8S_PER_TASK, kustomize, load_yaml


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="session")
def base_resources() -> list[dict[str, Any]]:
    return kustomize(K8S_BASE)


@pytest.fixture(scope="session")
def per_task_resources() -> list[dict[str, Any]]:
    return kustomize(K8S_PER_TASK)


@pytest.fixture(scope="session")
def fleet_resources() -> list[dict[str, Any]]:
    return kustomize(K8S_FLEET)


@pytest.fixture(scope="session")
def api_client() -> Any:
    """An HTTP client on the real app, not started (no engines): what probes and Prometheus
    see of the routes that need no service state. The app is built with an API key set."""
    from fastapi.testclient import TestClient

    from emo_serve.api import create_app
    from emo_serve.settings import Settings

    return TestClient(create_app(Settings(api_key="a-key")))


@pytest.fixture(scope="session")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir in which the embedded demo model has been resolved (generated) once."""
    from emo_serve.default_model import resolve_default_model

    state = tmp_path_factory.mktemp("state")
    resolve_default_model(state)
    return state
