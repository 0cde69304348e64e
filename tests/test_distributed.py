"""Multi-process checks, run under torchrun with gloo on 2 CPU processes."""

import os
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: str, marker: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(HERE, "dist", script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 or marker not in proc.stdout:
        pytest.fail(f"{script} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def test_lora_fa_under_fsdp2_keeps_a_frozen_and_matches_unsharded():
    _torchrun("lora_fa_fsdp2.py", "LORA_FA_FSDP2_OK")


def test_sharded_export_equals_unsharded_for_every_method():
    _torchrun("sync_fsdp2.py", "SYNC_FSDP2_OK 28")
