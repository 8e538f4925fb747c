#!/usr/bin/env bash
# The one command the device machine runs (bench/gpu_check.py's docstring): after `bash bench/gpu_wheels.sh` here,
#     run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560)
# Installs the carried wheels into /tmp/site, checks that the machine's flax builds the model (else installs the
# carried flax too), then runs every section of bench/gpu_check.py within BUDGET_S (default 480 s) and leaves
# $OUT/gpu_check.json and $OUT/gpu_check.log. Extra arguments go to gpu_check.py.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT_DIR" /tmp/site
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
t0=$(date +%s)
{
  echo "== gpu_run.sh $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi -L || true
  "$PY" --version
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
      echo "warning: wheel install failed"
  else
    echo "warning: no .whl/*.whl carried (run bench/gpu_wheels.sh here and pass carry=[\".whl\"])"
  fi
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  # Does the machine's flax build and differentiate the model? (abstractly, on the CPU: no GPU memory taken)
  check='
import jax, jax.numpy as jnp, flax
from abstractinator_jax import steps, train_state
from abstractinator_jax.cli import load_config_file
from abstractinator_jax.model import AbstractinatorPyramid
cfg = load_config_file("configs/tiny.py"); cfg.sequence_length = 64
m = AbstractinatorPyramid(cfg); ids = jnp.zeros((1, 64), jnp.int32)
v = jax.eval_shape(lambda: m.init({"params": jax.random.key(0), "vq": jax.random.key(1)}, ids, ids == 1))
jax.eval_shape(jax.grad(lambda p: m.apply({"params": p}, ids, ids == 1)[0]), flax.linen.unbox(v["params"]))
print("model check: ok with flax", flax.__version__, "at", flax.__file__)
'
  if ! JAX_PLATFORMS=cpu "$PY" -c "$check"; then
    echo "model check failed with the machine's flax: installing the carried one"
    if compgen -G ".whl/fallback/*.whl" >/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/fallback/*.whl || echo "warning: fallback wheel install failed"
      JAX_PLATFORMS=cpu "$PY" -c "$check" || echo "warning: the model check still fails; running anyway"
    fi
  fi
  echo "setup: $(($(date +%s) - t0)) s"
  "$PY" bench/gpu_check.py --budget_s "${BUDGET_S:-480}" "$@"
  echo "gpu_run.sh: exit $? after $(($(date +%s) - t0)) s"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
