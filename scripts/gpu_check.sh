#!/usr/bin/env bash
# make gpu-check: the GPU check for a bare GPU machine (no network; torch but maybe no zarr, numcodecs or
# DALI), sized for under 8 minutes (not yet timed on a GPU), with Markdown output.
#   0. what the machine lacks comes from gpu-bundle/ (scripts/gpu_bundle.py builds it where there is network):
#      split wheels are joined, every wheel's SHA-256 checked, and they are installed, without network, into
#      .gpu-env/site (the machine's own torch and numpy are kept);
#   1. tier 1, torch + zarr: cached, online and plain students and the dump on CUDA (scripts/gpu_tier1.py);
#   2. tier 2, when DALI imports: mixed (nvJPEG) against CPU decoding (scripts/gpu_check.py), then a short
#      teacher and dump through the CLI on a small ImageNet-LT tree of JPEGs, decoded by nvJPEG.
# Usage: bash scripts/gpu_check.sh   (PYTHON=python3 and GPU_BUNDLE=gpu-bundle by default)
#        GPU_CHECK_REHEARSAL=1 bash scripts/gpu_check.sh   on a CPU, at toy sizes: tries the bundle and the
#        scripts end to end before a GPU is lent (its figures mean nothing and its verdicts are not applied)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-gpu-bundle}
SITE=.gpu-env/site
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
REHEARSAL=${GPU_CHECK_REHEARSAL:-}
device=cuda; cpu_flags=()
if [ -n "$REHEARSAL" ]; then device=cpu; cpu_flags=(--allow-cpu); fi

has() { "$PY" -c "import $1" 2>/dev/null; }

install_bundle() {
  "$PY" scripts/gpu_bundle.py --join "$BUNDLE"
  # only the wheels this Python lacks: its own numpy, torchvision and pillow stay, as its torch was built with them
  mapfile -t wheels < <("$PY" scripts/gpu_bundle.py --join "$BUNDLE" --missing)
  if [ ${#wheels[@]} -gt 0 ]; then
    # --no-deps: the bundle holds the whole dependency closure (pip download resolved it)
    "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}"
  fi
  # DALI and its codecs live under nvidia/, as torch's CUDA libraries do elsewhere on the path; a pkgutil-style
  # nvidia/__init__.py lets one `nvidia` package span both places
  if [ -d "$SITE/nvidia" ] && [ ! -f "$SITE/nvidia/__init__.py" ]; then
    echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" > "$SITE/nvidia/__init__.py"
  fi
}

echo "## dive GPU check"
echo
if [ -z "$REHEARSAL" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA GPU is visible to torch; run it on a GPU machine (or GPU_CHECK_REHEARSAL=1 to rehearse on a CPU)')"
else
  echo "- REHEARSAL on the CPU at toy sizes: figures mean nothing, verdicts are not applied"
fi
echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
echo "- Python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "with torch", torch.__version__, "CUDA", torch.version.cuda)')"
if [ -d "$SITE" ]; then export PYTHONPATH="$PWD/$SITE:$PYTHONPATH"; fi
if ! has zarr || ! has numcodecs || ! has torchvision || ! has PIL || { [ -d "$BUNDLE" ] && ! has nvidia.dali; }; then
  if [ -d "$BUNDLE" ]; then
    install_bundle
    export PYTHONPATH="$PWD/$SITE:$PYTHONPATH"
  elif ! has zarr || ! has numcodecs || ! has torchvision || ! has PIL; then
    echo "gpu-check: this Python lacks zarr, numcodecs, torchvision or pillow, and there is no $BUNDLE/ folder. On a machine with" \
         "network run 'python scripts/gpu_bundle.py', copy gpu-bundle/ here, and run make gpu-check again." >&2
    exit 2
  fi
fi
echo "- packages: $("$PY" -c 'import zarr, numcodecs; print("zarr", zarr.__version__, "numcodecs", numcodecs.__version__)')," \
     "DALI $("$PY" -c 'import nvidia.dali as d; print(d.__version__)' 2>/dev/null || echo 'not importable (tier 2 skipped)')"
fmnist=()
if [ -d "$BUNDLE/fmnist" ]; then fmnist=(--fmnist-root "$BUNDLE/fmnist"); fi
if [ -d "$BUNDLE/photos" ]; then export DIVE_PHOTOS="$(cd "$BUNDLE/photos" && pwd)"; fi
echo
status=0
tier1_flags=("${fmnist[@]}")
if [ -n "$REHEARSAL" ]; then tier1_flags+=(--allow-cpu --quick); fi
"$PY" scripts/gpu_tier1.py "${tier1_flags[@]}" || status=1
echo
if has nvidia.dali; then
  "$PY" scripts/gpu_check.py "${cpu_flags[@]}" || status=1
  echo
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); \
from photo_data import write_jpeg_tree; write_jpeg_tree(Path('$work/imagenet'), images=300, side=160, classes=3)"
  tiny=(--set model=resnet32 --set crop_size=32 --set resize=36 --set batch_size=50 --set epochs=1
        --set warmup_epochs=0 --set lr=0.01)
  t0=$(date +%s)
  if "$PY" -m stages.cli teacher --dataset imagenet-lt --data-root "$work/imagenet" "${tiny[@]}" --device $device \
       --out "$work/teacher" > "$work/teacher.log" 2>&1 &&
     "$PY" -m stages.cli cache --teacher "$work/teacher" --set views=4 --data-root "$work/imagenet" --device $device \
       --out "$work/cache" > "$work/cache.log" 2>&1; then
    summary=$("$PY" -c "from store.reader import LogitStore; s = LogitStore.open('$work/cache/logits.zarr'); \
print(f'{s.n} x {s.v} x {s.c} {s.codec}, complete')")
    echo "| tier 2 stage run | result |"
    echo "|---|---|"
    echo "| teacher + cache through the CLI, ImageNet-LT JPEGs, decoded on $device | $summary in $(( $(date +%s) - t0 ))s |"
  else
    echo "tier 2 stage run FAILED; its logs:"
    tail -n 30 "$work/teacher.log" "$work/cache.log" 2>/dev/null || true
    status=1
  fi
else
  echo "### Tier 2: skipped (DALI cannot be imported; copy a gpu-bundle/ built without --no-dali)"
fi
echo
echo "gpu-check: $([ $status = 0 ] && echo PASS || echo FAIL) in $(( $(date +%s) - start ))s${REHEARSAL:+ (rehearsal: not a verdict)}"
if [ -n "$REHEARSAL" ]; then exit 0; fi
exit $status
