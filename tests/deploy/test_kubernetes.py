"""The Kubernetes manifests: `kubectl kustomize` renders the base and the per-task overlay, every
rendered resource validates against the Kubernetes schemas, and the pods would start the server
with settings it accepts; a per-task pod's startup (minus the engines) is replayed for real."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from deploy_helpers import DOCKERFILE, K8S_PER_TASK, REPO, by_kind, image_env, pod_env, settings_for

# The oldest Kubernetes release these manifests must still validate against, and the newest.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
SECRET = {"api-key": "test-api-key"}  # `kubectl create secret generic emo-serve-keys ...`
TASKS = sorted(p.name for p in K8S_PER_TASK.iterdir() if (p / "subset.json").is_file())


def the_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def mounted_files(deployment: dict[str, Any], config_maps: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Path in the container -> content, for every ConfigMap volume the container mounts."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    files = {}
    for mount in the_container(deployment)["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source:
            for key, text in config_maps[source["name"]]["data"].items():
                files[f"{mount['mountPath']}/{key}"] = text
    return files


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_resources_validate(base_resources: list, per_task_resources: list, version: str) -> None:
    for resource in base_resources + per_task_resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_validation_rejects_a_broken_deployment(base_resources: list) -> None:
    broken = copy.deepcopy(by_kind(base_resources, "Deployment")["emo-serve"])
    the_container(broken)["readinesProbe"] = the_container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_base_deployment(base_resources: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes on /ready and /health, a GPU, the image's user, volumes at the image's paths, the
    keys from a Secret, a Service on the container port; the settings start the real model."""
    deployments, services = by_kind(base_resources, "Deployment"), by_kind(base_resources, "Service")
    claims = by_kind(base_resources, "PersistentVolumeClaim")
    deployment = deployments["emo-serve"]
    container = the_container(deployment)
    env = pod_env(deployment, by_kind(base_resources, "ConfigMap"), SECRET)
    settings = settings_for(monkeypatch, {**image_env(), **env})
    assert settings.model == "allenai/Emo_1b14b_1T" and settings.host == "0.0.0.0"
    assert settings.api_key is not None and settings.api_key.get_secret_value() == SECRET["api-key"]

    (port,) = container["ports"]
    assert port["containerPort"] == settings.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and f"USER {security['runAsUser']}:" in DOCKERFILE.read_text()

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for path in (env.get("HF_HOME", image_env()["HF_HOME"]), str(settings.state_dir)):
        assert volumes[mounts[path]]["persistentVolumeClaim"]["claimName"] in claims

    (service,) = services.values()
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_one_deployment_and_service_per_task(per_task_resources: list) -> None:
    """Each task folder gives emo-serve-TASK; a Service reaches only its own task's pods."""
    assert TASKS, "no task folder with a subset.json"
    deployments, services = by_kind(per_task_resources, "Deployment"), by_kind(per_task_resources, "Service")
    assert set(deployments) == set(services) == {f"emo-serve-{t}" for t in TASKS}
    assert not by_kind(per_task_resources, "PersistentVolumeClaim")
    for name, service in services.items():
        selector = service["spec"]["selector"].items()
        reached = {d for d, dep in deployments.items()
                   if selector <= dep["spec"]["template"]["metadata"]["labels"].items()}
        assert reached == {name}
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() == selector
    assert deployments["emo-serve-code"]["spec"]["replicas"] == 2


@pytest.mark.parametrize("task", TASKS)
def test_task_pod_starts_with_its_subset_preloaded(task: str, per_task_resources: list, demo_state: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's settings (ConfigMap + Secret) preload the manifest its ConfigMap volume holds.
    Replayed with the server's own start-up code (`EmoService.prepare`: base, manifest checked
    against the base's fingerprint, materialized, startup models within --max-engines), with the
    mounted files and the state dir placed under a temp dir; only the engines are not started."""
    from emo_serve.api.service import EmoService
    from emo_serve.subset import SubsetSpec

    deployment = by_kind(per_task_resources, "Deployment")[f"emo-serve-{task}"]
    config_maps = by_kind(per_task_resources, "ConfigMap")
    env = {**image_env(), **pod_env(deployment, config_maps, SECRET)}
    settings = settings_for(monkeypatch, env)
    assert not settings.serve_base and settings.max_engines == 1

    files = mounted_files(deployment, config_maps)
    for path in settings.preload_subsets:
        assert str(path) in files, f"{path} is not mounted from a ConfigMap"
        spec = SubsetSpec.parse(files[str(path)])
        assert spec.name == task == deployment["metadata"]["labels"]["emo-serve.io/subset"]
        local = tmp_path / str(path).lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(files[str(path)])
    state = tmp_path / "state"  # an emptyDir per pod: only a generated demo model is reused
    if (demo_state / "models").is_dir():  # absent when the trained demo model ships in the package
        shutil.copytree(demo_state / "models", state / "models")
    local_env = {**env, "EMO_STATE_DIR": str(state),
                 "EMO_PRELOAD_SUBSETS": ",".join(str(tmp_path / str(p).lstrip("/")) for p in settings.preload_subsets)}
    service = EmoService(settings_for(monkeypatch, local_env))
    try:
        service.prepare()
    except Exception as exc:  # most likely: the embedded demo model changed; say how to remake
        script = (K8S_PER_TASK / "remake-subsets.sh").relative_to(REPO)
        pytest.fail(f"{exc}\nIf the embedded demo model changed, remake the example manifests: "
                    f"PATH=$PWD/.venv/bin:$PATH bash {script}")
    records = service.registry.records
    assert {name: r.state.value for name, r in records.items()} == {task: "ready"}
    assert (records[task].model_dir / "config.json").is_file()  # what the engine would load
