#!/usr/bin/env bash
# Train with the backbone in a DeepSpeed ZeRO engine (train.engine=deepspeed), launched by torchrun like
# launch/single_node.sh, or like launch/multi_node.sh when NNODES > 1 (same variables). The DeepSpeed
# JSON is generated from the config (deepspeed.stage, deepspeed.config for an override file).
# First use compiles DeepSpeed's CPU comm op into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
# Usage: [ZERO_STAGE=1|2] [NPROC_PER_NODE=8] launch/deepspeed.sh CONFIG [--set a.b=c ...]
# Example: NPROC_PER_NODE=8 launch/deepspeed.sh configs/ms1mv3_r50_deepspeed.yaml
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [ZERO_STAGE=1|2] $0 CONFIG [--set a.b=c ...]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="$1"
shift
sets=(--set train.engine=deepspeed)
if [ -n "${ZERO_STAGE:-}" ]; then
  sets+=(--set "deepspeed.stage=$ZERO_STAGE")
fi
if [ "${NNODES:-1}" -gt 1 ]; then
  exec "$here/multi_node.sh" "$config" "${sets[@]}" "$@"
fi
exec "$here/single_node.sh" "$config" "${sets[@]}" "$@"
