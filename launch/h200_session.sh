#!/usr/bin/env bash
# Reproduces the one-GPU figures of BENCHMARKS.md (kernel table; 128K training, full attention against MoBA 512:8),
# each part within 10 minutes on an H200. Results go to copies of BENCHMARKS.md and results/*.json under ${OUT:-out}/
# (merge them into the checkout by hand or copy them over); PYTHON (default: .venv/bin/python if present, else
# python) runs the benchmarks:
#   bash launch/h200_session.sh kernels     # python -m train.bench_kernels, the 8 points of the README table
#   bash launch/h200_session.sh cold        # the same points' first fwd+bwd, each in a new process, empty Triton cache
#   bash launch/h200_session.sh train       # python -m train.bench, 128K: full, MoBA 512:8, MoBA 512:8@keeproute
#   bash launch/h200_session.sh train -- model.compile=true     # the same with overrides for every run
set -uo pipefail
part=${1:-kernels}; shift || true
[ "${1:-}" = "--" ] && shift
case "$part" in kernels|cold|train) ;; *) echo "usage: $0 kernels|cold|train [-- overrides]" >&2; exit 2 ;; esac
OUT=${OUT:-out}; mkdir -p "$OUT"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export WANDB_MODE=${WANDB_MODE:-disabled}
cp -n BENCHMARKS.md "$OUT/BENCHMARKS.md"
POINTS="8192:4096:12 8192:512:3 32768:2048:3 131072:512:8 131072:4096:12 2x65536:128:8 524288:4096:12 1048576:4096:12"
if [ "$part" = kernels ]; then
  cp -n results/kernels.json "$OUT/kernels.json"
  "$PYTHON" -m train.bench_kernels --methods full,triton --reps 3 --points $POINTS \
    --output "$OUT/BENCHMARKS.md" --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  rc=$?; log="$OUT/kernels.log"; rows=18
elif [ "$part" = cold ]; then
  "$PYTHON" -m train.bench_kernels --cold --points $POINTS > "$OUT/cold.log" 2>&1
  rc=$?; log="$OUT/cold.log"; rows=10
else
  cp -n results/train.json "$OUT/train.json"
  timeout 580 "$PYTHON" -m train.bench --steps 20 --points 131072:512:8,131072:full,131072:512:8@keeproute \
    --output "$OUT/BENCHMARKS.md" --json "$OUT/train.json" ${1:+-- "$@"} > "$OUT/train.log" 2>&1
  rc=$?; log="$OUT/train.log"; rows=5
  find runs/bench -name metrics.jsonl 2>/dev/null | tar czf "$OUT/metrics.tgz" -T - 2>/dev/null
fi
if [ "$rc" -ne 0 ]; then
  echo "$part: exit status $rc; the end of $log:" >&2; tail -n 15 "$log" >&2
fi
grep -E "^\|" "$log" | tail -n "$rows"
exit "$rc"
