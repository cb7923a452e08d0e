#!/usr/bin/env bash
# Builds each Docker image's Python environment here, without Docker, by running the image's own
# install line on a copy of its build context, so tests/test_images.py can prove that what the
# image ships is enough for what its entry point, compose services and Kubernetes containers run:
#
#   .venv-image-serve   Dockerfile.serve's `RUN bash scripts/install_gateway_env.sh /opt/venv`
#   .venv-image-train   Dockerfile.train's `RUN bash scripts/install_train_env.sh /opt/venv ...`
#                       with VARIANT=cpu (the CUDA variant adds requirements/cuda-lock.txt only)
#
#   scripts/setup_image_envs.sh [serve|train ...]     (default: both; idempotent)
#
# The RUN line is read from the Dockerfile and run as written (with /opt/venv -> the venv here), in
# a folder holding exactly the files the build stage COPYs, so the two cannot drift apart. A venv
# is rebuilt from scratch (fresh, as in the image) when the Dockerfile, a requirements file or an
# install script changes, and the install line reruns in place when only the package source
# (jaxclf/, installed into the training image) changed; otherwise nothing is done.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHON="${PYTHON:-python3.11}"  # the images' python:3.11.7 (tests/test_images.py checks)
command -v "$PYTHON" >/dev/null || PYTHON=python3

# The build stage (first FROM up to the next) of a Dockerfile, line continuations joined.
build_stage() {
  sed -e ':a' -e '/\\$/N; s/\\\n/ /; ta' "$1" | awk '/^FROM /{n++} n==1'
}

stamp_of() {  # stamp_of DOCKERFILE CTX [find filters]: sha256 of the Dockerfile and the files
  local dockerfile="$1" ctx="$2"
  shift 2
  (cat "$dockerfile"; cd "$ctx" && find . -type f "$@" | LC_ALL=C sort | xargs sha256sum) \
    | sha256sum | cut -c1-16
}

build_env() {  # build_env NAME DOCKERFILE
  local name="$1" dockerfile="$REPO/$2" venv="$REPO/.venv-image-$1" ctx run src
  ctx="$(mktemp -d)"
  # Exactly what the build stage COPYs (no --from), bytecode and built extensions left out as
  # the image's .dockerignore does.
  while read -r -a parts; do
    for src in "${parts[@]:1:${#parts[@]}-2}"; do
      (cd "$REPO" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' "$src") \
        | tar -xf - -C "$ctx"
    done
  done < <(build_stage "$dockerfile" | grep -E '^COPY ' | grep -v -- '--from')
  run="$(build_stage "$dockerfile" | grep -E '^RUN bash scripts/install_[a-z]+_env\.sh /opt/venv' \
         | sed -e 's/^RUN //')"
  [[ -n "$run" ]] || { echo "setup_image_envs.sh: no install line in $2" >&2; return 1; }
  # Two stamps: the pins and install steps (Dockerfile, requirements, scripts), whose change means
  # a fresh venv; and everything copied (the package source too), whose change alone means the
  # install line runs again in place (pins already satisfied; the package is reinstalled).
  local deps_stamp src_stamp
  deps_stamp="$venv/.jaxclf-image-deps-$(stamp_of "$dockerfile" "$ctx" -not -path './jaxclf/*')"
  src_stamp="$venv/.jaxclf-image-src-$(stamp_of "$dockerfile" "$ctx")"
  if [[ -f "$deps_stamp" && -f "$src_stamp" ]]; then
    echo "image env $name: up to date ($venv)"
  else
    if [[ ! -f "$deps_stamp" ]]; then
      echo "== image env $name (fresh venv): $run"
      rm -rf "$venv"
    else
      echo "== image env $name (source changed, install line again): $run"
    fi
    # The RUN line as written; /opt/venv -> "$IMAGE_VENV", and ${VARIANT} (Dockerfile.train's
    # ARG) is cpu.
    (cd "$ctx" && IMAGE_VENV="$venv" VARIANT=cpu bash -c "${run//\/opt\/venv/\"\$IMAGE_VENV\"}") \
      || { rm -rf "$ctx"; echo "setup_image_envs.sh: $2's install line failed" >&2; return 1; }
    rm -f "$venv"/.jaxclf-image-*
    touch "$deps_stamp" "$src_stamp"
  fi
  rm -rf "$ctx"
}

build_one() {
  case "$1" in
    serve) build_env serve Dockerfile.serve ;;
    train) build_env train Dockerfile.train ;;
    *) echo "setup_image_envs.sh: unknown image $1 (serve | train)" >&2; exit 2 ;;
  esac
}
for image in "${@:-serve train}"; do
  for one in $image; do build_one "$one"; done
done
