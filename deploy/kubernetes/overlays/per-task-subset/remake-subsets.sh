#!/usr/bin/env bash
# Remake the example manifests (*/subset.json) from each task's examples.jsonl, on the embedded
# demo model as `emo-serve serve` resolves it (EMO_STATE_DIR, else ~/.local/share/emo-serve).
# Needed when the embedded demo model changes: a manifest only loads on the base it was made for.
#   PATH="$PWD/.venv/bin:$PATH" bash deploy/kubernetes/overlays/per-task-subset/remake-subsets.sh
set -euo pipefail
cd "$(dirname "$0")"
base="$(python -c 'from emo_serve.settings import Settings, resolve_default_model as r
print(r(Settings().state_dir))')"
for task in */; do
    task="${task%/}"
    [ -f "$task/examples.jsonl" ] || continue
    emo-serve profile --base "$base" --examples "$task/examples.jsonl" --size 4 --method usage \
        --name "$task" --quiet -o "$task/subset.json"
done
# The profiler records where it read the base (a path on this machine); the server rebinds a
# preloaded manifest to the base it serves once the fingerprint matches, so record the model id.
python - */subset.json <<'PY'
import sys
from emo_serve.settings import DEFAULT_MODEL_ID
from emo_serve.subset import SubsetSpec
for path in sys.argv[1:]:
    spec = SubsetSpec.load(path)
    spec.model_copy(update={"base": spec.base.model_copy(update={"location": DEFAULT_MODEL_ID})}).save(path)
PY
