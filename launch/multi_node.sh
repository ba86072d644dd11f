#!/usr/bin/env bash
# Train on NNODES machines: run this once on every node, with the same MASTER_ADDR:MASTER_PORT (the
# rendezvous endpoint, reachable from all nodes; node 0 hosts it) and that node's NODE_RANK.
# Usage: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 [MASTER_PORT=29500] [NPROC_PER_NODE=8] \
#        launch/multi_node.sh CONFIG [--set a.b=c ...]
# Static rendezvous: node ranks are the given NODE_RANKs, and global rank = NODE_RANK * NPROC_PER_NODE + local rank.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST [MASTER_PORT=P] $0 CONFIG [--set a.b=c ...]" >&2
  exit 2
fi
: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1, this node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host name or address of node 0)}"
exec python -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "${NPROC_PER_NODE:-auto}" --rdzv_backend static \
  --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" -m largefr train "$@"
