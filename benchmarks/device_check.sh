#!/usr/bin/env bash
# The GPU checks as one prepared run, for a session lent a GPU machine (the `device` tool, ~15 minutes
# of device time in all): model parity on the GPU, then GroupViT-S train-step throughput and MFU.
#
# The lent image has jax, flax, optax, torch and transformers but not ml-collections (a pure-Python
# wheel), so carry it. Here, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections==1.1.0
# then one call: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540).
# What it prints also lands in $OUT (parity.txt, bench.txt). On a CPU the same script runs with
# CONFIG=configs/tiny.py BATCH_SIZES=4 (what the test suite does not cover: the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
CONFIG=${CONFIG:-configs/groupvit_s.py}
BATCH_SIZES=${BATCH_SIZES:-64,256}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl \
    || { echo "device_check: installing the carried wheels (.whl/) failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import sys, jax, flax, optax, ml_collections
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "devices", jax.devices())' \
  || { echo "device_check: the model's imports fail on this machine (see above)"; exit 1; }

status=0
# Parity with HF transformers' GroupViTModel (PyTorch on the host), both configs, both weight formats.
python3 -m pytest -q -p no:cacheprovider -s tests/models/test_parity.py 2>&1 | tee "$OUT/parity.txt" \
  | grep -E "^parity|passed|failed|Error"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# Train-step throughput and MFU (against the peak table for known accelerators), both precisions.
python3 -m benchmarks.train_step --config="$CONFIG" --batch_sizes="$BATCH_SIZES" --dtypes=bfloat16,float32 \
  --torch=false --forward=false --steps=5 --rounds=2 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
