#!/usr/bin/env bash
# The GPU checks as one run: model parity on the GPU, then GroupViT-S train-step throughput and MFU
# against HF transformers' GroupViTModel on the same GPU (eager PyTorch, CUDA), and a profile trace per
# bf16 row.
#
# For a GPU image that has jax, flax, optax, torch and transformers but not ml-collections (a pure-Python
# wheel): wheels placed in .whl/ are installed first, and flax and optax at our pins in .whl/fallback/
# are installed only when the model does not build with the image's. To fetch them, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections==1.1.0
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl/fallback flax==0.12.8 optax==0.2.8
# What it prints also lands in $OUT (parity.txt, bench_bf16.txt, bench_fp32.txt, bench_bf16_cudnn.txt and
# b<batch>_bfloat16.xplane.pb.gz: jax.profiler traces, read with jax.profiler.ProfileData). On a CPU the
# same script runs with CONFIG=configs/tiny.py BF16_BATCH_SIZES=4 FP32_BATCH_SIZES=4 CUDNN_BATCH_SIZES=.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
CONFIG=${CONFIG:-configs/groupvit_s.py}
BF16_BATCH_SIZES=${BF16_BATCH_SIZES:-128,256,512}
FP32_BATCH_SIZES=${FP32_BATCH_SIZES:-256}
CUDNN_BATCH_SIZES=${CUDNN_BATCH_SIZES-256}  # empty: no cuDNN-attention row
STEPS=${STEPS:-10}
# JAX takes half the GPU, leaving the rest to PyTorch in the same process (default: 75 % to JAX).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
install() {  # wheels into /tmp/site, ahead of the image's packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" \
    || { echo "device_check: installing the carried wheels ($*) failed"; exit 1; }
}
if compgen -G ".whl/*.whl" > /dev/null; then
  install .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv,noheader
versions() {
  python3 -c 'import sys, jax, flax, optax, ml_collections
try:
  import torch, transformers; ref = f"torch {torch.__version__} (cuda {torch.cuda.is_available()}) transformers {transformers.__version__}"
except ImportError as e:
  ref = f"no PyTorch reference ({e})"
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      ref, "devices", jax.devices())'
}
smoke() {  # the model and the optimizer build and run a forward pass (tiny config)
  python3 -c 'import jax
from groupvit_jax import config_lib, optim, train_state
from groupvit_jax.models import build_model, random_variables
config = config_lib.load_config("configs/tiny.py")
model = build_model(config.model)
random_variables(model, config.model, jax.random.key(0))
print("device_check: the tiny model builds on", jax.devices()[0].platform)' 2>&1 | tail -4
  return "${PIPESTATUS[0]}"
}
versions || { echo "device_check: the model's imports fail on this machine (see above)"; exit 1; }
if ! smoke; then
  if compgen -G ".whl/fallback/*.whl" > /dev/null; then
    echo "device_check: the image's flax/optax fail with our code; installing the carried pins"
    install .whl/fallback/*.whl
    versions && smoke || { echo "device_check: the model does not build with the carried pins either"; exit 1; }
  else
    echo "device_check: the model does not build here (see above)"; exit 1
  fi
fi

status=0
# Parity with HF transformers' GroupViTModel (PyTorch on the host), both configs, both weight formats.
timeout 180 python3 -m pytest -q -p no:cacheprovider -s tests/models/test_parity.py 2>&1 | tee "$OUT/parity.txt" \
  | grep -E "^parity|passed|failed|Error"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# Train-step throughput, MFU and step memory against PyTorch on the same device; bf16 rows traced.
bench() {  # dtype, batch sizes, output file, extra flags
  timeout 300 python3 -m benchmarks.train_step --config="$CONFIG" --dtypes="$1" --batch_sizes="$2" \
    --forward=false --steps="$STEPS" --rounds=3 "${@:4}" 2>&1 | grep -v "^[IWE][0-9]" | tee "$OUT/$3"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
rm -rf /tmp/device_check_profiles
bench bfloat16 "$BF16_BATCH_SIZES" bench_bf16.txt --profile_dir=/tmp/device_check_profiles
bench float32 "$FP32_BATCH_SIZES" bench_fp32.txt
# Last, so that a failure costs nothing above: the image tower's attention as cuDNN's fused kernel
# (model.attention="cudnn"), ours alone, to hold against the bf16 rows at the same batch.
if [ -n "$CUDNN_BATCH_SIZES" ]; then
  bench bfloat16 "$CUDNN_BATCH_SIZES" bench_bf16_cudnn.txt --attention=cudnn --torch=false
fi
for d in /tmp/device_check_profiles/*/; do
  f=$(find "$d" -name "*.xplane.pb" | head -1)
  [ -n "$f" ] && gzip -c "$f" > "$OUT/$(basename "$d").xplane.pb.gz"
done
ls -la "$OUT"
exit $status
