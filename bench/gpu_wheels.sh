#!/usr/bin/env bash
# Downloads, here, the pure-python wheels that bench/gpu_check.py needs on the device machine (python3 3.12, offline,
# with jax, flax, optax, chex, numpy, absl-py and PyYAML but no ml_collections) into .whl/ (git-ignored), for
#     run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560)
#
#   .whl/ml_collections-*.whl    always installed there (every module of the package imports it; its own needs,
#                                absl-py and PyYAML, are on the machine)
#   .whl/fallback/flax-*.whl     the flax this project is developed with, installed there only when the machine's own
#                                flax cannot build the model (gpu_run.sh checks that first)
#
# Nothing else is needed: bench/gpu_check.py's imports (steps, train_state, model, flops, sharding, config, cli) do not
# reach grain or orbax (data.py and checkpointing.py). Versions: the project's venv's (pyproject's minimums).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ML_COLLECTIONS=${ML_COLLECTIONS_VERSION:-1.1.0}
FLAX=${FLAX_VERSION:-0.12.8}
download() {  # pip download for the device's interpreter: CPython 3.12 on x86-64 Linux, binary wheels only, no deps
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any "$@"
}
rm -rf .whl
mkdir -p .whl/fallback
download -d .whl "ml_collections==$ML_COLLECTIONS"
download -d .whl/fallback "flax==$FLAX"
ls -l .whl .whl/fallback
echo "total: $(du -sb .whl | cut -f1) bytes (the device call carries at most 64 MiB with the working tree)"
