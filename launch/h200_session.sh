#!/usr/bin/env bash
# Reproduces the one-GPU figures of BENCHMARKS.md (kernel table; 128K training, full attention against MoBA 512:8),
# each part within 10 minutes on an H200. Results go to copies of BENCHMARKS.md and results/*.json under ${OUT:-out}/
# (merge them into the checkout by hand or copy them over):
#   bash launch/h200_session.sh kernels     # python -m train.bench_kernels, the 8 points of the README table
#   bash launch/h200_session.sh train       # python -m train.bench, 128K: full, MoBA 512:8, MoBA 512:8@keeproute
#   bash launch/h200_session.sh train -- model.compile=true     # the same with overrides for every run
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export WANDB_MODE=${WANDB_MODE:-disabled}
part=${1:-kernels}; shift || true
[ "${1:-}" = "--" ] && shift
cp -n BENCHMARKS.md "$OUT/BENCHMARKS.md"
case "$part" in
  kernels)
    cp -n results/kernels.json "$OUT/kernels.json"
    python -m train.bench_kernels --methods full,triton --reps 3 --points 8192:4096:12 8192:512:3 32768:2048:3 \
      131072:512:8 131072:4096:12 2x65536:128:8 524288:4096:12 1048576:4096:12 \
      --output "$OUT/BENCHMARKS.md" --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
    rc=$?; grep -E "^\|" "$OUT/kernels.log" | tail -n 18 ;;
  train)
    cp -n results/train.json "$OUT/train.json"
    timeout 580 python -m train.bench --steps 20 --points 131072:512:8,131072:full,131072:512:8@keeproute \
      --output "$OUT/BENCHMARKS.md" --json "$OUT/train.json" ${1:+-- "$@"} > "$OUT/train.log" 2>&1
    rc=$?
    find runs/bench -name metrics.jsonl | tar czf "$OUT/metrics.tgz" -T - 2>/dev/null
    grep -E "^\|" "$OUT/train.log" | tail -n 4 ;;
  *) echo "usage: $0 kernels|train [-- overrides]" >&2; exit 2 ;;
esac
exit $rc
