#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (under 5 minutes on an H100):
#   1. DALI `mixed` (nvJPEG) decoding and the GPU view executor against the CPU ones (scripts/gpu_check.py);
#   2. a short dump on the GPU: a tiny teacher on a small ImageNet-LT-format tree of JPEGs, then `dive cache`
#      with --device cuda, decoding with nvJPEG, and a check that the store is complete.
# Usage: PYTHON=python3 bash scripts/gpu_check.sh   (make gpu-check uses the project's .venv)
set -euo pipefail
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== 1. mixed decoding vs CPU decoding"
"$PY" scripts/gpu_check.py
echo "== 2. a short dump on the GPU"
"$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, '.'); \
from tests.test_file_datasets import write_imagenet_lt; write_imagenet_lt(Path('$work/imagenet'))"
tiny=(--set model=resnet32 --set crop_size=32 --set resize=36 --set batch_size=50 --set epochs=1
      --set warmup_epochs=0 --set lr=0.01)
start=$(date +%s)
"$PY" -m stages.cli teacher --dataset imagenet-lt --data-root "$work/imagenet" "${tiny[@]}" --device cuda \
  --out "$work/teacher"
"$PY" -m stages.cli cache --teacher "$work/teacher" --set views=4 --data-root "$work/imagenet" --device cuda \
  --out "$work/cache"
"$PY" -c "from store.reader import LogitStore; s = LogitStore.open('$work/cache/logits.zarr'); \
print('store complete:', s.n, 'x', s.v, 'x', s.c, s.codec)"
echo "gpu check passed in $(( $(date +%s) - start ))s (part 2)"
