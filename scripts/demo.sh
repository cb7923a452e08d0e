#!/usr/bin/env bash
# One command from a fresh machine to a trained, evaluated, exported and registered model on
# Fashion-MNIST (the main job):
#   bash scripts/demo.sh [RUN_DIR]            (default runs/demo; rerunning resumes / skips done steps)
# Steps: set up .venv -> train configs/cnn.py -> evaluate on the held-out test set (report.html)
# -> export ONNX (parity-checked against JAX) -> register as `fashion` and promote to production.
# Serving it (Triton or the REST gateway) is one more command, printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/demo}
EXPORT="exports/$(basename "$WORKDIR")"
bash scripts/setup.sh
.venv/bin/python -m jaxclf.main --config=configs/cnn.py --workdir="$WORKDIR"
.venv/bin/jaxclf evaluate --model-path "$WORKDIR" --test-data fashion_mnist --out "$WORKDIR/eval"
if [ ! -f "$EXPORT/model.onnx" ]; then
  .venv/bin/jaxclf export --run "$WORKDIR" --out "$EXPORT" --register fashion
  version=$(.venv/bin/jaxclf registry list fashion --json 2>/dev/null | .venv/bin/python -c \
    "import json,sys; print(max(v['version'] for v in json.load(sys.stdin)))" 2>/dev/null || echo 1)
  .venv/bin/jaxclf registry promote fashion "$version" --stage production --reason "demo run $WORKDIR"
fi
cat <<MSG
run record:  $WORKDIR/run.json        report: $WORKDIR/eval/report.html
export:      $EXPORT                  registry: registry:fashion@production
TensorBoard: .venv/bin/tensorboard --logdir $(dirname "$WORKDIR")
serve:       .venv/bin/jaxclf serve --model-path registry:fashion@production --port 8000
             curl -F file=@image.png localhost:8000/v1/predict
MSG
