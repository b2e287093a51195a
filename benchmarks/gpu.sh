#!/usr/bin/env bash
# The GPU rows of the benchmarks in one go, each a `python -m benchmarks.<script>` run under `timeout`, all within
# a total budget (default 470 s: it stops cleanly before 8 minutes), one JSON per row (the machine described in it):
#
#   ntk_speed-mlp-16384-gpu.json     reference MLP, output-traced NTK at N = 16384, matmul precision "highest"
#                                    (full float32) and "tensorfloat32" (opt-in TF32); each one's max relative error
#                                    against float64 on the block of the first 1024 samples (1024 x 1024 entries:
#                                    the whole kernel in float64 would cost as much as the row itself)
#   cv_scale-full-100000-gpu.json    matrix-free (SLQ) entropy, with its standard error, and Hutch++ trace of the
#                                    reference MLP's full NTK at N = 100,000 (10^6 x 10^6); no dense eigvalsh
#   ntk_speed-resnet18-1024-gpu.json ResNet-18 (32x32x3, BatchNorm in eval mode), output-traced NTK at N = 1024,
#                                    implementation "auto" (the JSON says which it picked), float64 block of 32
#   monitor_overhead-gpu.json        the default digits run (1000 steps, NTK every 50) with and without the
#                                    default (asynchronous) monitor, cold and warm compilation cache, one repeat
#
# Usage (from anywhere; rows run from the repository root):
#
#   benchmarks/gpu.sh                 # the GPU sizes, into benchmarks/results/
#   benchmarks/gpu.sh --smoke DIR     # every row at tiny sizes, on any device, into DIR (seconds; tests run it)
#
# Environment: PYTHON (default: python), BUDGET_SECONDS (default 470). A row that fails or times out is reported
# and the others still run; the exit status is 1 if any row failed or was skipped for want of time.
#
# An offline GPU machine needs what `import ntkcv` and the training run import: jax (with its CUDA plugin), flax,
# optax, numpy, scipy, jaxtyping, matfree, h5py, tensorboardX (and protobuf), scikit-learn, orbax-checkpoint,
# pyyaml, rich, threadpoolctl, flatbuffers. Carry the missing ones as wheels (on the H200 image: matfree and
# tensorboardX), fetched where there is internet for the other machine's Python and platform:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheels matfree tensorboardX
#
# and there, in the repository root, before running this script:
#
#   pip install --no-index --find-links wheels -e .
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python}
BUDGET_SECONDS=${BUDGET_SECONDS:-470}
smoke=0
out=benchmarks/results
case "${1:-}" in
  --smoke) smoke=1; out=${2:?"--smoke needs an output folder: benchmarks/gpu.sh --smoke DIR"} ;;
  "") ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu.sh: unknown argument '$1' (expected nothing, --smoke DIR or --help)" >&2; exit 2 ;;
esac
mkdir -p "$out"

failed=0
start=$SECONDS
# run_row NAME LIMIT_SECONDS COMMAND...: COMMAND under `timeout` (the smaller of LIMIT and what is left of the budget)
run_row() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_SECONDS - (SECONDS - start) - 10))  # 10 s: timeout's grace before SIGKILL
  if ((left < 15)); then
    echo "== $name: skipped, ${left} s left of the ${BUDGET_SECONDS} s budget" >&2
    failed=1
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit} s): $*" >&2
  local row_start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local status=$?
  if ((status != 0)); then
    echo "== $name: failed (exit $status$( ((status == 124)) && echo ", timed out after $limit s"))" >&2
    failed=1
  else
    echo "== $name: done in $((SECONDS - row_start)) s" >&2
  fi
}

if ((smoke)); then
  mlp_n=32 mlp_block=16 cv_row=full:16 cv_probes="--probes 2 --matvecs 4" resnet_n=8 resnet_block=4
  resnet_widths="--widths 4,4,4,4" monitor="--steps 60 --caches cold"
else
  mlp_n=16384 mlp_block=1024 cv_row=full:100000 cv_probes="--probes 20 --matvecs 20" resnet_n=1024 resnet_block=32
  resnet_widths="" monitor="--steps 1000 --caches cold,warm"
fi
tag=$( ((smoke)) && echo smoke || echo gpu)

run_row "MLP traced NTK, N = $mlp_n, float32 and TF32" 150 \
  "$PYTHON" -m benchmarks.ntk_speed --models mlp --modes traced --ns "$mlp_n" --precisions highest,tensorfloat32 \
  --reference-block "$mlp_block" --reps 3 --output "$out/ntk_speed-mlp-$mlp_n-$tag.json"
# shellcheck disable=SC2086  # the option lists are meant to split
run_row "matrix-free entropy of the full NTK, ${cv_row#full:} samples" 150 \
  "$PYTHON" -m benchmarks.cv_scale --rows "$cv_row" --matrix-free-only $cv_probes --timeout 140 \
  --output "$out/cv_scale-full-${cv_row#full:}-$tag.json"
# shellcheck disable=SC2086
run_row "ResNet-18 traced NTK, N = $resnet_n, implementation auto" 120 \
  "$PYTHON" -m benchmarks.ntk_speed --models resnet18 --modes traced --ns "$resnet_n" --precisions highest \
  --reference-block "$resnet_block" $resnet_widths --reps 3 --output "$out/ntk_speed-resnet18-$resnet_n-$tag.json"
# shellcheck disable=SC2086
run_row "monitor overhead of the default run" 170 \
  "$PYTHON" -m benchmarks.monitor_overhead --modes off,on $monitor --repeats 1 \
  --output "$out/monitor_overhead-$tag.json"

echo "== all rows: $((SECONDS - start)) s; results in $out" >&2
exit $failed
