#!/usr/bin/env bash
# Several nodes with DeepSpeed's launcher (passwordless ssh between nodes). HOSTFILE lines: "<host> slots=8"
#   HOSTFILE=launch/hostfile.example launch/deepspeed_hostfile.sh parallel.sp_size=8 parallel.zero_stage=3
# Every rank must write into one run directory. DeepSpeed's launcher has no store to share rank 0's start
# time through (torchrun has), so without a hydra.run.dir argument the time-stamped one is fixed here, once.
# --no_local_rank: the ranks read LOCAL_RANK from the environment (Hydra refuses a --local_rank argument).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE}"
args=("$@")
given=0
for a in "$@"; do [[ $a == hydra.run.dir=* ]] && given=1; done
[ "$given" = 1 ] || args+=("hydra.run.dir=runs/$(date +%Y-%m-%d/%H-%M-%S)")
exec "${DEEPSPEED:-.venv/bin/deepspeed}" --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module train "${args[@]}"
