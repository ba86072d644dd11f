"""Process groups, backend/device choice and collectives (the only distributed code in largefr)."""
from largefr.distributed.collectives import (
    all_gather_objects,
    all_gather_rows,
    all_reduce_,
    all_reduce_max_,
    barrier,
    broadcast_object,
    global_rank,
    gather_rows_with_grad,
    group_rank,
    group_size,
    reduce_scatter_rows,
    sum_partials_with_grad,
)
from largefr.distributed.ddp import allreduce_sum_hook, broadcast_buffers, wrap_ddp_sum
from largefr.distributed.env import (
    DistContext,
    choose_backend_and_device,
    free_port,
    init_distributed,
    init_from_env,
    shutdown,
)

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_gather_rows",
    "all_reduce_",
    "all_reduce_max_",
    "barrier",
    "broadcast_object",
    "global_rank",
    "allreduce_sum_hook",
    "broadcast_buffers",
    "choose_backend_and_device",
    "free_port",
    "gather_rows_with_grad",
    "group_rank",
    "group_size",
    "init_distributed",
    "init_from_env",
    "reduce_scatter_rows",
    "shutdown",
    "sum_partials_with_grad",
    "wrap_ddp_sum",
]
