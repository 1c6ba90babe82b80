#!/usr/bin/env bash
# The checks that need a GPU, in one run on a machine with one (about 8 minutes): the CUDA tests
# (both engines and the fused one against the CPU reference; a whole study on the GPU), then
# `bench.anytime` on digits, (c) `--fuse 1` with 4 workers sharing the GPU against (d) as
# shipped, each alone for $MINUTES. Output under $OUT (default gpu-out/).
#
#   bench/gpu-wheels.sh                  # here: the packages the GPU machine lacks, into .whl/
#   bench/gpu.sh                         # there, with .whl carried
#
# DEVICE=cpu runs the same steps on the CPU (the CUDA tests skip): a check of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
MINUTES=${MINUTES:-2}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PY:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import bench; print(bench.environment())"
} | tee "$OUT/machine.txt"
timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py 2>&1 \
  | tee "$OUT/test_cuda.txt"
tests=${PIPESTATUS[0]}
timeout $((MINUTES * 2 * 60 + 180)) $PY -m bench.anytime digits --device "$DEVICE" \
  --c-workers 4 --only cd --minutes "$MINUTES" 2>&1 | tee "$OUT/anytime-$DEVICE.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench.anytime exit $bench" | tee -a "$OUT/machine.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
