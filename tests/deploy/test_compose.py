"""docker-compose.yml, checked without a container engine: the compose specification's schema,
which services each profile starts, and the settings each service's container would start
`emo-serve serve` with (built by the server's own CLI parser and `Settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from deploy_helpers import COMPOSE_FILE, DEPLOY, REPO, env_file, image_env, load_yaml, run, settings_for, tool


def check_compose_schema(path: Path) -> Any:
    return run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])


def enabled(compose: dict[str, Any], profiles: set[str]) -> set[str]:
    """Compose's rule: a service runs if it has no profiles or one of them is active."""
    return {name for name, svc in compose["services"].items()
            if not svc.get("profiles") or profiles & set(svc["profiles"])}


def container_port(service: dict[str, Any], host_ip: str | None = None) -> int:
    (mapping,) = service["ports"]
    *host, published, target = mapping.split(":")
    assert (host[0] if host else None) == host_ip, mapping
    assert published == target, mapping
    return int(target)


def volume_targets(service: dict[str, Any]) -> set[str]:
    return {v.split(":")[1] for v in service["volumes"]}


def test_compose_file_follows_the_compose_specification() -> None:
    result = check_compose_schema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_file(tmp_path: Path, compose: dict[str, Any]) -> None:
    broken = dict(compose, services={**compose["services"],
                                     "emo-serve": {**compose["services"]["emo-serve"], "restart_policy": "always"}})
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    assert check_compose_schema(tmp_path / "docker-compose.yml").returncode != 0


def test_plain_up_starts_the_gpu_server_and_cpu_profile_only_the_cpu_server(compose: dict[str, Any]) -> None:
    """`docker compose up` takes its profiles from COMPOSE_PROFILES in ./.env; any --profile
    flag replaces that list. Every service is in a profile, so `--profile cpu` on a laptop does
    not also start the GPU service (which would fail without an NVIDIA driver)."""
    default = set(env_file(REPO / ".env")["COMPOSE_PROFILES"].split(","))
    assert enabled(compose, default) == {"emo-serve"}
    assert enabled(compose, {"cpu"}) == {"emo-serve-cpu"}
    assert enabled(compose, {"gpu", "monitoring"}) == {"emo-serve", "prometheus"}
    assert enabled(compose, {"cpu", "monitoring"}) == {"emo-serve-cpu", "prometheus"}
    assert all(svc.get("profiles") for svc in compose["services"].values())


def test_gpu_service(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU reservation, volumes at the image's HF_HOME and state dir, a documented env file,
    and the settings of deploy/.env.example: refused until a key is filled in."""
    svc = compose["services"]["emo-serve"]
    assert svc["build"]["args"]["TARGET"] == "cuda"
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    image = image_env()
    assert {image["HF_HOME"], image["EMO_STATE_DIR"]} <= volume_targets(svc)
    assert svc["restart"] == "unless-stopped" and "healthcheck" in svc
    (env_ref,) = svc["env_file"]
    assert env_ref == {"path": "deploy/.env", "required": False}
    assert run(["git", "check-ignore", "-q", "deploy/.env"], cwd=REPO).returncode == 0

    example = env_file(DEPLOY / ".env.example")
    env = {**image, **example}
    with pytest.raises(ValidationError, match="no admin key"):
        settings_for(monkeypatch, env)
    settings = settings_for(monkeypatch, {**env, "EMO_API_KEY": "k"})
    assert settings.model == "allenai/Emo_1b14b_1T" and settings.serve_base
    assert settings.port == container_port(svc)


def test_cpu_profile_runs_the_demo_model_with_real_options(compose: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU service's command and environment, on top of the image's ENV, are options the
    server accepts: the embedded demo model, bound to 0.0.0.0 in the container, published on
    the host's loopback only (the reason it may leave admin open), nothing from deploy/.env."""
    svc = compose["services"]["emo-serve-cpu"]
    assert svc["build"]["args"]["TARGET"] == "cpu" and "deploy" not in svc and "env_file" not in svc
    env = {**image_env(), **svc["environment"]}
    settings = settings_for(monkeypatch, env, svc["command"])
    assert settings.model is None and settings.serve_base  # the embedded demo model
    assert settings.host == "0.0.0.0" and settings.allow_insecure_admin
    assert settings.port == container_port(svc, host_ip="127.0.0.1")
    assert {env["HF_HOME"], str(settings.state_dir)} <= volume_targets(svc)
    assert (settings.max_engines, settings.kv_cache_gb) == (2, 1.0)

    without_opt_out = {k: v for k, v in env.items() if k != "EMO_ALLOW_INSECURE_ADMIN"}
    with pytest.raises(ValidationError, match="no admin key"):
        settings_for(monkeypatch, without_opt_out, svc["command"])


def test_probes_and_scraper_use_real_unauthenticated_routes(compose: dict[str, Any], api_client: Any) -> None:
    """The health checks and Prometheus hit routes the app has and that need no key (the app
    here has an API key set); Prometheus scrapes the server services on their container port."""
    paths = {getattr(r, "path", None) for r in api_client.app.routes}
    for name in ("emo-serve", "emo-serve-cpu"):
        probe = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert "/ready" in probe and "/ready" in paths
    assert api_client.get("/health").status_code == 200
    metrics = api_client.get("/metrics")
    assert metrics.status_code == 200 and "emo_requests" in metrics.text
    assert api_client.get("/v1/models").status_code == 401  # the key is really enforced

    prometheus = compose["services"]["prometheus"]
    config_mount = next(v for v in prometheus["volumes"] if v.startswith("./deploy/prometheus/"))
    config = load_yaml(REPO / config_mount.split(":")[0])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    targets = {t.split(":")[0]: int(t.split(":")[1]) for t in static["targets"]}
    servers = ("emo-serve", "emo-serve-cpu", "emo-serve-fleet-a", "emo-serve-fleet-b")
    assert targets == {name: int(image_env()["EMO_PORT"]) for name in servers}


def shm_bytes(size: str | int) -> int:
    """Compose's byte values: an int, or a number with a b/k/m/g suffix (powers of 1024)."""
    if isinstance(size, int):
        return size
    units = {"b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
    number = size.rstrip("bkmgBKMG")
    return int(float(number) * units[size[len(number):].lower() or "b"])


def test_every_service_that_starts_vllm_has_enough_shared_memory(compose: dict[str, Any]) -> None:
    """vLLM's CPU engine needs ~160 MiB of /dev/shm at start; a container gets 64 MiB by default,
    and with it the engine died at start and /ready stayed 503 (seen with the real CPU image)."""
    servers = {name: svc for name, svc in compose["services"].items() if "emo-serve" in svc.get("image", "")}
    assert servers.keys() == {"emo-serve", "emo-serve-cpu", "emo-serve-fleet-a", "emo-serve-fleet-b"}
    for name, svc in servers.items():
        assert "shm_size" in svc, f"{name}: no shm_size"
        assert shm_bytes(svc["shm_size"]) >= 512 * 1024**2, f"{name}: shm_size {svc['shm_size']}"
