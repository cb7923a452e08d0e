#!/usr/bin/env bash
# One command from a fresh machine to a trained, evaluated model on Fashion-MNIST:
#   bash scripts/demo.sh [runs/demo]
# Set up (.venv), train configs/cnn.py (resumes if the run dir exists), then print the record.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/demo}
bash scripts/setup.sh
.venv/bin/python -m jaxclf.main --config=configs/cnn.py --workdir="$WORKDIR"
if .venv/bin/python -c "import jaxclf.evaluate.evaluate" 2>/dev/null; then
  .venv/bin/jaxclf evaluate --model-path "$WORKDIR" --test-data fashion_mnist --out "$WORKDIR/eval"
fi
echo "run record: $WORKDIR/run.json   TensorBoard: .venv/bin/tensorboard --logdir $(dirname "$WORKDIR")"
