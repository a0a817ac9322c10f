#!/usr/bin/env bash
# Developer build: compiles ltkernels._C in place (incremental, ninja). Serialised with a lock so that
# parallel shells never run two builds in one build directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
exec flock /tmp/ltkernels_build.lock python setup.py build_ext --inplace "$@"
