#!/usr/bin/env bash
# One prepared run on a lent GPU machine (jax/flax/optax/orbax/torch preinstalled there; grain and
# ml_collections travel as wheels in .whl/). 1) GPU correctness: the model-core, graph-head and HF-parity
# tests on the GPU with fp32 matmuls; 2) bf16 MAE pretraining MFU for ViT-B and ViT-L.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_mae_core.py tests/test_au_graph.py tests/test_parity_hf.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout "${MFU_TIMEOUT:-330}" python3 benchmarks/gpu_mfu.py "$@" 2>&1 | grep -v "^I1\|^W1\|^I0\|^W0" \
  | tee "$OUT/gpu_mfu.txt"
