#!/usr/bin/env bash
# Several nodes with DeepSpeed's launcher (passwordless ssh between nodes). HOSTFILE lines: "<host> slots=8"
#   HOSTFILE=launch/hostfile.example launch/deepspeed_hostfile.sh parallel.sp_size=8 parallel.zero_stage=3
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE}"
exec "${DEEPSPEED:-.venv/bin/deepspeed}" --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" \
  --module train "$@"
