#!/usr/bin/env bash
# GPU check for a lent NVIDIA machine (H100/H200 image: torch with CUDA 13, nvcc, no
# TensorRT, no internet, possibly no SimpleITK). Under 5 minutes:
#   1. make SimpleITK importable (from wheels carried in .whl/ when the image lacks it),
#   2. build fastlmk with the CUDA vote kernel,
#   3. run the CUDA-relevant tests (vote, preprocessing, backends incl. torch-cuda),
#   4. run benchmarks/latency.py on the GPU backends (and CPU torch for the ratios),
#   5. print a short table last.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh
# Device-tool call: carry [".whl"]; results land in $OUT when it is set.
# .whl/ must hold a cp312 manylinux SimpleITK wheel, e.g.:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl SimpleITK==2.5.7
set -uo pipefail
PY=${PYTHON:-python3}
OUTDIR=${OUT:-/tmp/fastlmk_gpu_check}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 FASTLMK_CACHE_DIR="$PWD/engines"
log() { echo "== $*"; }
fail() { echo "FAILED: $*"; exit 1; }

log "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "no GPU"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

if ! $PY -c "import SimpleITK" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || fail "SimpleITK is missing and .whl/ holds no wheel: carry .whl (see the header)"
  log "installing carried wheels: $(ls .whl)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || fail "wheel install"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
for mod in SimpleITK safetensors onnx onnxruntime pytest; do
  $PY -c "import $mod" 2>/dev/null || echo "note: $mod is not importable; tests needing it skip or fail"
done

log "build (CUDA vote kernel)"
SECONDS=0
timeout 180 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUTDIR/build.log" 2>&1 \
  || { tail -30 "$OUTDIR/build.log"; fail "build"; }
$PY -c "from fastlmk import _C; assert _C.cuda_compiled(), 'built without CUDA'; print('CUDA vote compiled')" \
  || fail "CUDA kernel"
echo "build took ${SECONDS}s"

log "tests"
SECONDS=0
# "slow" tests train phantom models on the CPU first; the untrained ones cover the GPU paths.
timeout 150 $PY -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_vote.py \
  tests/test_preprocess.py tests/test_backends.py tests/test_export.py 2>&1 | tee "$OUTDIR/tests.log" | tail -15
test_rc=${PIPESTATUS[0]}
echo "tests took ${SECONDS}s (rc=$test_rc)"

log "latency"
backends="torch torch-cuda torch-cuda-graphs"
$PY -c "import tensorrt" 2>/dev/null && backends="$backends tensorrt"
timeout 150 $PY benchmarks/latency.py --out "$OUTDIR/latency_gpu.json" --backends $backends \
  --warmup 5 --repeats 40 2>"$OUTDIR/latency.err" | tee "$OUTDIR/latency.txt"
lat_rc=${PIPESTATUS[0]}
[ "$lat_rc" -eq 0 ] || tail -20 "$OUTDIR/latency.err"

log "summary (tests rc=$test_rc, latency rc=$lat_rc; JSON: $OUTDIR/latency_gpu.json)"
cat "$OUTDIR/latency.txt" 2>/dev/null | tail -8
