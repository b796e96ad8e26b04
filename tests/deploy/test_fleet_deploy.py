"""The fleet: emo-serve replicas that share their subsets through PostgreSQL, behind vllm-router,
as the kustomize overlay `fleet` and the compose profile `fleet` run them. Checked like the other
deployment files: rendered, validated against the Kubernetes schemas, and the settings each
replica would start with built by the server's own `Settings`. The router's flags are parsed by
the real `vllm-router`'s own parser, its image's Dockerfile goes through hadolint, and what
docs/deployment.md says the router hashes on is measured on the real router binary in front of
two stub replicas."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
from pydantic import ValidationError

from deploy_helpers import K8S_FLEET, REPO, ROUTER_DOCKERFILE, by_kind, image_env, pod_env, settings_for, tool
from test_compose import enabled, shm_bytes
from test_dockerfile import hadolint
from test_kubernetes import K8S_VERSIONS, SECRET

# What `kubectl create secret generic emo-serve-store --from-literal=url=...` would hold.
STORE_URL = "postgresql://emo:a-password@emo-serve-postgres:5432/emo"
POD_NAME = "emo-serve-7c9d6b5f48-x2k4q"  # what a Deployment names a pod (EMO_REPLICA_ID)
NAMESPACE = "inference"
FLEET_SERVICES = {"postgres", "emo-serve-fleet-a", "emo-serve-fleet-b", "router"}


# ---- helpers ---------------------------------------------------------------------------------

def router_args(argv: Sequence[str]) -> Any:
    """`vllm-router ARGV` up to the point where it would start serving: the launcher's own
    argument parser (SystemExit 2 on an unknown flag or a bad value), its checks of the parsed
    arguments, and their conversion into the Rust router's configuration object."""
    from vllm_router.launch_router import parse_router_args
    from vllm_router.router import Router

    args = parse_router_args(list(argv))
    args._validate_router_args()
    Router.from_args(copy.deepcopy(args))  # converts in place: on a copy
    return args


def expand(args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion of a container's args from its environment."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in args]


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR-default}` against `env` (the forms the
    compose file uses; any other `$` form fails here so that this helper grows with the file)."""
    def one(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env[name]

    out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", one, value)
    assert "$" not in out, f"a compose interpolation this helper does not know: {value!r}"
    return out


def container(pod_owner: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod_owner["spec"]["template"]["spec"]["containers"]
    return c


def pod_labels(pod_owner: dict[str, Any]) -> dict[str, str]:
    return pod_owner["spec"]["template"]["metadata"]["labels"]


def port_number(c: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return port


def dockerfile_args(path: Path) -> dict[str, str]:
    """`ARG NAME=default` of a Dockerfile."""
    from dockerfile_parse import DockerfileParser

    return dict(i["value"].split("=", 1) for i in DockerfileParser(str(path)).structure
                if i["instruction"] == "ARG" and "=" in i["value"])


def dockerfile_values(path: Path, kind: str) -> list[str]:
    from dockerfile_parse import DockerfileParser

    return [i["value"] for i in DockerfileParser(str(path)).structure if i["instruction"] == kind]


def router_version() -> str:
    return importlib.metadata.version("vllm-router")


# ---- Kubernetes: the overlay ------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_fleet_resources_validate(fleet_resources: list, version: str) -> None:
    kinds = {r["kind"] for r in fleet_resources}
    assert {"Deployment", "Service", "StatefulSet", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    for resource in fleet_resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_replicas_keep_their_state_in_postgres_not_on_volumes(fleet_resources: list, base_resources: list,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Several replicas rolled one at a time, no PersistentVolumeClaim (a ReadWriteOnce volume
    pins a pod to one node), the store's URL from a Secret, the pod name as replica id, the
    base's probes; the settings the pods get start the real server on the shared store."""
    deployment = by_kind(fleet_resources, "Deployment")["emo-serve"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert not by_kind(fleet_resources, "PersistentVolumeClaim")
    volumes = spec["template"]["spec"]["volumes"]
    assert not [v["name"] for v in volumes if "persistentVolumeClaim" in v]

    c, base_c = container(deployment), container(by_kind(base_resources, "Deployment")["emo-serve"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe] == base_c[probe], probe
    env = {e["name"]: e for e in c["env"]}
    store_ref = env["EMO_STORE"]["valueFrom"]["secretKeyRef"]
    assert store_ref == {"name": "emo-serve-store", "key": "url"}  # required, not `optional`
    assert env["EMO_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    config_maps = by_kind(fleet_resources, "ConfigMap")
    for pod_name in (POD_NAME, "e" * 63):  # 63: the longest name Kubernetes gives a pod
        settings = settings_for(monkeypatch, {**image_env(), **pod_env(
            deployment, config_maps, {**SECRET, "url": STORE_URL}, {"metadata.name": pod_name})})
        assert settings.store is not None and settings.store.get_secret_value() == STORE_URL
        assert settings.replica_id == pod_name
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    by_name = {v["name"]: v for v in volumes}
    for path in (image_env()["HF_HOME"], str(settings.state_dir)):
        assert "emptyDir" in by_name[mounts[path]], path

    disruption = by_kind(fleet_resources, "PodDisruptionBudget")["emo-serve"]
    assert disruption["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()


def test_store_url_reaches_the_postgres_statefulset(fleet_resources: list) -> None:
    """PostgreSQL 15/16 with its own volume, password from a Secret, ready when `pg_isready`
    says so; the URL the kustomization tells you to put in the Secret names its Service, port,
    user and database."""
    (postgres,) = by_kind(fleet_resources, "StatefulSet").values()
    c = container(postgres)
    assert re.fullmatch(r"postgres:1[56]([.-].*)?", c["image"]), c["image"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "emo-serve-postgres", "key": "password"}
    assert c["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert env["PGDATA"]["value"].startswith(mount["mountPath"] + "/")

    service = by_kind(fleet_resources, "Service")[postgres["spec"]["serviceName"]]
    assert service["spec"]["selector"].items() <= pod_labels(postgres).items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "postgres" and port_number(c, "postgres") == 5432

    (url,) = set(re.findall(r"postgresql://[^\s\"']+", (K8S_FLEET / "kustomization.yaml").read_text()))
    parts = urlsplit(url)
    assert (parts.hostname, parts.port) == (service["metadata"]["name"], port["port"])
    assert parts.username == env["POSTGRES_USER"]["value"]
    assert parts.path == "/" + env["POSTGRES_DB"]["value"]


def test_router_discovers_and_checks_the_replicas(fleet_resources: list, api_client: Any) -> None:
    """The router's args, parsed by vllm-router itself: consistent hashing over the pods the
    emo-serve Deployment makes (and no other pod: not the router's, not PostgreSQL's), found in
    its own namespace at the replicas' port, health-checked on the replicas' readiness route."""
    deployments = by_kind(fleet_resources, "Deployment")
    router, replicas = deployments["emo-serve-router"], deployments["emo-serve"]
    (postgres,) = by_kind(fleet_resources, "StatefulSet").values()
    c = container(router)
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    args = router_args(expand(c["args"], {"POD_NAMESPACE": NAMESPACE}))

    assert args.policy == "consistent_hash" and args.service_discovery
    assert args.service_discovery_namespace == NAMESPACE  # a Role suffices, not a ClusterRole
    assert args.selector and args.selector.items() <= pod_labels(replicas).items()
    assert not args.selector.items() <= pod_labels(router).items()
    assert not args.selector.items() <= pod_labels(postgres).items()
    assert args.service_discovery_port == port_number(container(replicas), "http")
    readiness = container(replicas)["readinessProbe"]["httpGet"]["path"]
    assert args.health_check_endpoint == readiness
    assert readiness in {getattr(r, "path", None) for r in api_client.app.routes}

    assert args.host == "0.0.0.0" and args.port == port_number(c, "http")
    assert (args.prometheus_host, args.prometheus_port) == ("0.0.0.0", port_number(c, "metrics"))
    assert c["livenessProbe"]["httpGet"] == {"path": "/liveness", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "http"}

    services = by_kind(fleet_resources, "Service")
    router_service = services["emo-serve-router"]
    assert router_service["spec"]["selector"].items() <= pod_labels(router).items()
    assert not router_service["spec"]["selector"].items() <= pod_labels(replicas).items()
    assert not services["emo-serve"]["spec"]["selector"].items() <= pod_labels(router).items()


def test_router_may_watch_pods_in_its_namespace_and_nothing_more(fleet_resources: list) -> None:
    router = by_kind(fleet_resources, "Deployment")["emo-serve-router"]
    account = router["spec"]["template"]["spec"]["serviceAccountName"]
    assert account in by_kind(fleet_resources, "ServiceAccount")
    assert not by_kind(fleet_resources, "ClusterRole") and not by_kind(fleet_resources, "ClusterRoleBinding")
    (binding,) = by_kind(fleet_resources, "RoleBinding").values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    role = by_kind(fleet_resources, "Role")[binding["roleRef"]["name"]]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == [""] and rule["resources"] == ["pods"]
    assert {"list", "watch"} <= set(rule["verbs"]) <= {"get", "list", "watch"}


def test_router_image_and_user(fleet_resources: list) -> None:
    """The Deployment runs the router image at the pinned release, as the Dockerfile's user."""
    router = by_kind(fleet_resources, "Deployment")["emo-serve-router"]
    assert container(router)["image"] == f"vllm-router:{router_version()}"
    security = router["spec"]["template"]["spec"]["securityContext"]
    (user,) = dockerfile_values(ROUTER_DOCKERFILE, "USER")
    assert security["runAsNonRoot"] and user == f"{security['runAsUser']}:{security['runAsGroup']}"


# ---- the router's flags ------------------------------------------------------------------------

def test_router_parser_rejects_a_wrong_flag() -> None:
    """The parse above would catch a misspelt flag: vllm-router's parser refuses unknown flags
    and bad values, in process and as the installed `vllm-router` command (before it serves)."""
    good = ["--policy", "consistent_hash", "--health-check-endpoint", "/ready"]
    assert router_args(good).health_check_endpoint == "/ready"
    for bad in (["--policy", "consistent_hash", "--helth-check-endpoint", "/ready"],
                ["--policy", "consistent-hash"],
                ["--health-check-interval-secs", "ten"]):
        with pytest.raises(SystemExit) as exit_info:
            router_args(bad)
        assert exit_info.value.code == 2, bad
    result = subprocess.run([tool("vllm-router"), "--policy", "consistent_hash", "--helth-check-endpoint", "/ready"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unrecognized arguments: --helth-check-endpoint" in result.stderr


# ---- the router image --------------------------------------------------------------------------

def test_router_dockerfile_passes_hadolint() -> None:
    findings = hadolint(ROUTER_DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']} {f['code']}: {f['message']}" for f in findings)


def test_router_image_pins_the_tested_release() -> None:
    """One router release everywhere: the image's pin, the installed package the flags are
    checked against, and the `test` extra that installs it."""
    import tomllib

    assert dockerfile_args(ROUTER_DOCKERFILE)["VLLM_ROUTER_VERSION"] == router_version()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm-router=={router_version()}" in extras["test"]
    (install,) = [v for v in dockerfile_values(ROUTER_DOCKERFILE, "RUN") if "pip install" in v]
    assert '"vllm-router==${VLLM_ROUTER_VERSION}"' in install
    assert json.loads(dockerfile_values(ROUTER_DOCKERFILE, "ENTRYPOINT")[0]) == ["vllm-router"]
    uid = dockerfile_values(ROUTER_DOCKERFILE, "USER")[0].split(":")[0]
    assert int(uid) > 0
    (check,) = dockerfile_values(ROUTER_DOCKERFILE, "HEALTHCHECK")
    assert "/liveness" in check


# ---- Docker Compose: the `fleet` profile -------------------------------------------------------

def fleet_replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("emo-serve-fleet-")}


def test_fleet_profile_starts_postgres_replicas_and_router(compose: dict[str, Any]) -> None:
    assert enabled(compose, {"fleet"}) == FLEET_SERVICES
    assert len(fleet_replicas(compose)) >= 2
    for name in FLEET_SERVICES:
        assert compose["services"][name]["profiles"] == ["fleet"], name


def test_fleet_replicas_share_the_compose_postgres(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each replica's command and environment (interpolated as compose would, with a key set)
    are accepted by the real `Settings`: the store is the `postgres` service with its user,
    password and database; replica ids differ; state volumes are not shared; a replica waits
    for a healthy database. Without EMO_API_KEY a replica refuses to start."""
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:1[56]([.-].*)?", postgres["image"])
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "ports" not in postgres  # the database is reachable on the compose network only
    db = {k: interpolate(v, {}) for k, v in postgres["environment"].items()}

    ids, state_volumes = set(), []
    for svc in fleet_replicas(compose).values():
        assert svc["build"]["args"]["TARGET"] == "cpu" and svc["image"] == "emo-serve:cpu"
        assert svc["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert shm_bytes(svc["shm_size"]) >= 512 * 1024**2
        environment = {k: interpolate(v, {"EMO_API_KEY": "a-key"}) for k, v in svc["environment"].items()}
        settings = settings_for(monkeypatch, {**image_env(), **environment}, svc["command"])
        assert settings.store is not None
        url = urlsplit(settings.store.get_secret_value())
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert (url.username, url.password, url.path) == (
            db["POSTGRES_USER"], db["POSTGRES_PASSWORD"], "/" + db["POSTGRES_DB"])
        ids.add(settings.replica_id)
        (state,) = [v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == str(settings.state_dir)]
        state_volumes.append(state)
        (published,) = svc["ports"]
        assert published.startswith("127.0.0.1:"), published

        unset = {k: interpolate(v, {}) for k, v in svc["environment"].items()}
        with pytest.raises(ValidationError, match="no admin key"):
            settings_for(monkeypatch, {**image_env(), **unset}, svc["command"])
    assert len(ids) == len(fleet_replicas(compose)) and None not in ids
    assert len(set(state_volumes)) == len(state_volumes)
    assert not {"state", "state-cpu"} & set(state_volumes)


def test_compose_router_sends_to_the_replicas(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's command, parsed by vllm-router itself: every replica's service name and
    port, consistent hashing, /ready health checks; published on loopback only (its
    worker-management routes take no key); built from deploy/router at the pinned release."""
    router = compose["services"]["router"]
    args = router_args(router["command"])
    urls = []
    for name, svc in fleet_replicas(compose).items():
        environment = {k: interpolate(v, {"EMO_API_KEY": "a-key"}) for k, v in svc["environment"].items()}
        urls.append(f"http://{name}:{settings_for(monkeypatch, {**image_env(), **environment}).port}")
        assert router["depends_on"][name] == {"condition": "service_healthy"}
    assert sorted(args.worker_urls) == sorted(urls)
    assert args.policy == "consistent_hash" and args.health_check_endpoint == "/ready"
    (published,) = router["ports"]
    assert published == f"127.0.0.1:{args.port}:{args.port}" and args.host == "0.0.0.0"
    assert (REPO / router["build"]["context"] / "Dockerfile") == ROUTER_DOCKERFILE
    assert router["image"] == f"vllm-router:{router_version()}"


# ---- what the router does, measured on the real binary ------------------------------------------

class StubReplica(ThreadingHTTPServer):
    """An emo-serve stand-in: /health and /ready answer 200, every POST is recorded (path and
    headers) and answered with a chat completion whose text is the stub's name."""

    def __init__(self, name: str) -> None:
        self.name, self.seen = name, []
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StubHandler(BaseHTTPRequestHandler):
    server: StubReplica

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(200 if self.path in ("/health", "/ready") else 404, {"status": "ok"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        message = {"role": "assistant", "content": self.server.name}
        self._answer(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def log_message(self, *args: Any) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[StubReplica]]]:
    """The installed `vllm-router` with the fleet's policy and health checks, on loopback, in
    front of two stub replicas."""
    stubs = [StubReplica("a"), StubReplica("b")]
    port = free_port()
    log = tmp_path_factory.mktemp("router") / "router.log"
    with log.open("w") as out:
        proc = subprocess.Popen([tool("vllm-router"), "--host", "127.0.0.1", "--port", str(port),
                                 "--worker-urls", *(s.url for s in stubs), "--policy", "consistent_hash",
                                 "--health-check-endpoint", "/ready", "--prometheus-port", str(free_port())],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/readiness", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield base, stubs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for stub in stubs:
            stub.shutdown()
            stub.server_close()


def post(base: str, path: str, body: dict[str, Any], headers: Mapping[str, str] = {}) -> str:
    """POST through the router; the name of the stub that answered."""
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def chat(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def test_router_hashes_the_session_header_not_the_model(live_router: tuple[str, list[StubReplica]]) -> None:
    """docs/deployment.md, measured: with --policy consistent_hash, requests that carry the same
    X-Session-ID reach the same replica whatever their body, and different values spread over
    the replicas; chat requests without such a header all hash the same key, whatever their
    `model` or `user`, so the model alone gives no per-subset placement."""
    base, _ = live_router
    one_session = {post(base, "/v1/chat/completions", chat(model, f"prompt {i}"), {"X-Session-ID": "code"})
                   for i, model in enumerate(["code", "math", "emo-demo"] * 2)}
    assert len(one_session) == 1
    spread = {post(base, "/v1/chat/completions", chat(name, "q"), {"X-Session-ID": name})
              for name in [f"subset-{i}" for i in range(16)]}
    assert spread == {"a", "b"}
    no_header = {post(base, "/v1/chat/completions", chat(model, f"prompt {model}"))
                 for model in [f"subset-{i}" for i in range(16)]}
    assert len(no_header) == 1
    by_user = {post(base, "/v1/chat/completions", {**chat("code", "q"), "user": name})
               for name in [f"user-{i}" for i in range(16)]}
    assert by_user == no_header  # the body's `user` does not count either (chat, 0.1.17)


def test_router_forwards_keys_on_the_openai_routes_only(live_router: tuple[str, list[StubReplica]]) -> None:
    """docs/deployment.md, measured: the Authorization header reaches the replica on
    /v1/chat/completions, but not on a route outside the OpenAI API (the subsets API), which is
    why subset administration goes to a replica directly."""
    base, stubs = live_router
    key = {"Authorization": "Bearer a-key", "X-Session-ID": "code"}
    for path, body in (("/v1/chat/completions", chat("code", "q")), ("/v1/subsets", {"name": "code"})):
        for stub in stubs:
            stub.seen.clear()
        post(base, path, body, key)
        ((seen_path, headers),) = [s for stub in stubs for s in stub.seen]
        assert seen_path == path
        if path == "/v1/chat/completions":
            assert headers["authorization"] == "Bearer a-key" and headers["x-session-id"] == "code"
        else:
            assert "authorization" not in headers
