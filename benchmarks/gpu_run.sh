#!/usr/bin/env bash
# One prepared run on a lent GPU machine (jax/flax/optax/orbax/torch preinstalled there; grain and
# ml_collections travel as wheels in .whl/):
#  1) bf16 MAE pretraining MFU for ViT-B and ViT-L with XLA attention and cuDNN fused attention
#     (model.attention="cudnn": sequence padded, models.vit.padded_attention), after a bf16-vs-float32 check of
#     both attention paths, and a jax.profiler split of every case's device time;
#     All with XLA's Triton GEMMs off: with them on, cuDNN-attention runs stalled (benchmarks/README.md);
#  2) ViT-B with cuDNN attention and XLA's default flags (Triton GEMMs on), in its own process, to bisect that;
#  3) the model-core tests on the GPU with float32 matmuls.
# Each part has its own timeout, so a slow one still leaves the others' output in $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
quiet() { grep -v "^I1\|^W1\|^I0\|^W0\|round [0-9]*/\|warm-up"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout "${MFU_TIMEOUT:-300}" python3 benchmarks/gpu_mfu.py --attention=xla,cudnn --check_attention \
  --profile_steps=3 "$@" 2>&1 | quiet | tee "$OUT/gpu_mfu.txt"
timeout "${VARIANT_TIMEOUT:-120}" python3 benchmarks/gpu_mfu.py --models=B --attention=cudnn --steps=6 2>&1 \
  | grep -v "^I1\|^W1\|^I0\|^W0" | tee "$OUT/gpu_mfu_triton_gemm_on.txt"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_mae_core.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
