"""A peer that stops taking part (alive, but never reaching the collective) is an error after the
process group's timeout (``train.collective_timeout_s``; the default was 1800 s), never a hang."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from faults_common import CONFIG
from largefr.distributed import free_port

RANK_SCRIPT = """
import os, sys, time
import torch, torch.distributed as dist
from largefr.config import load_config
from largefr.train.cli import init_process_group
ctx = init_process_group(load_config(sys.argv[1], [f"train.collective_timeout_s={sys.argv[2]}"]))
if ctx.rank == 1:
    time.sleep(60)  # a stuck peer
    sys.exit(0)
started = time.monotonic()
try:
    dist.all_reduce(torch.ones(1), group=ctx.group)
except Exception as exc:
    print(f"FAILED after {time.monotonic() - started:.1f} s: {type(exc).__name__}", flush=True)
    os._exit(1)
print("NO ERROR", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stuck_peer_fails_the_collective_after_the_configured_timeout():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(CONFIG), "3"], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        started = time.monotonic()
        out, _ = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1 and "FAILED after" in out, out[-2000:]
    waited = float(out.split("FAILED after ")[1].split(" s")[0])
    assert 2.0 <= waited < 30.0 and elapsed < 60, out[-2000:]  # the default of 1800 s would hang this test
