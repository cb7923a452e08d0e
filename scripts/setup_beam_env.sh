#!/usr/bin/env bash
# Builds .venv-beam: Apache Beam for `jaxclf data ingest --runner=...` (jaxclf/data/beam_ingest.py),
# apart from .venv because apache-beam 2.77 pins protobuf<7 and pyarrow<26 (and pillow<13), which
# the training lock (protobuf 7, pyarrow 26, pillow 13) cannot take. No jax here: the pipeline
# imports only the jax-free jaxclf.data modules, made importable through a .pth file (not
# `pip install -e .`, which would pull in the training dependencies).
#
#   scripts/setup_beam_env.sh [VENV_DIR]        (default: <repo>/.venv-beam; idempotent)
#   jaxclf data ingest SRC --out DIR --runner=direct --direct_num_workers=2 \
#     --direct_running_mode=multi_processing   (re-executes itself in .venv-beam)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-beam}"
bash "$REPO/scripts/pinned_venv.sh" "$VENV" "$REPO/requirements/beam.txt"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$REPO" > "$SITE/jaxclf_repo.pth"
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
import apache_beam, array_record, pyarrow
import gcsfs, s3fs, gcp_storage_emulator  # gs:// and s3:// output; the tests' GCS emulator
import jaxclf.data.beam_ingest  # via the .pth; must not import jax
assert importlib.util.find_spec("jax") is None and "jax" not in sys.modules
print(f"beam env ok: apache-beam {apache_beam.__version__}, pyarrow {pyarrow.__version__}")
PY
echo "beam env: $VENV"
