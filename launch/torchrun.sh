#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes):
#   launch/torchrun.sh parallel.sp_size=2 parallel.zero_stage=2 data.seq_len=32768
# On a CPU (gloo), two processes:  DEVICE_NPROC=2 launch/torchrun.sh device=cpu
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python; fi
if [ -n "${DEVICE_NPROC:-}" ]; then
  NPROC=$DEVICE_NPROC; export DS_ACCELERATOR=cpu LOCAL_SIZE=$NPROC
else
  NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-1}" -m train "$@"
