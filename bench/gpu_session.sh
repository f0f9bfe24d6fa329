#!/usr/bin/env bash
# Everything a GPU session owes, in as few device calls as possible (run from the repository root on the GPU
# machine; logs and results land in $OUT, default bench/results):
#   bash bench/gpu_session.sh build     # build the extension with its CUDA kernels, print the environment
#   bash bench/gpu_session.sh test      # the cuda-marked tests, then compute-sanitizer memcheck on the op tests
#   bash bench/gpu_session.sh bench     # kernel microbenchmarks + the end-to-end benchmark vs transformers
# The in-place build lives only while the machine stays warm: after a cold start, build again in the same call
# (e.g. `bash bench/gpu_session.sh build && bash bench/gpu_session.sh test`).
set -uo pipefail
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}  # the GPU machine's python3 holds its torch; there may be no plain `python`
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
case "${1:-all}" in
  build|all)
    $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
    $PY -m phi_fast.env | tee "$OUT/env.txt" ;;&
  test|all)
    $PY -m pytest python_tests -m cuda -q -rs 2>&1 | tee "$OUT/cuda-tests.log"
    if command -v compute-sanitizer >/dev/null; then  # may refuse the device under gVisor (device KINDS.md)
      compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest python_tests/test_ops_cuda.py -q -x \
        -k "not 2048" 2>&1 | tail -40 | tee "$OUT/memcheck.log"
    fi ;;&
  bench|all)
    for suite in norm activation rotary_cache attention patch_embed gemm quant_linear; do
      $PY -m bench.kernels.$suite --out "$OUT" 2>&1 | tail -30
    done
    $PY -m bench.e2e --out "$OUT" 2>&1 | tail -40 ;;
esac
