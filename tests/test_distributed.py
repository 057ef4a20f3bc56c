"""DDP and FSDP2 with flash_fx on 2 CPU processes (gloo): losses and gradients equal to the same training without
flash_fx, and no attention left unrewritten when DDP's optimizer cuts the graph at bucket boundaries."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_and_fsdp2_match_eager():
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               str(ROOT / "examples" / "train_distributed.py")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = done.stdout
    assert "Backend compiler exception" not in done.stderr, done.stderr[-4000:]  # e.g. a data read on fake tensors
    assert out.strip().splitlines()[-1] == "distributed OK", out
    ddp = re.search(r"DDP: .*max loss diff (\S+), max grad diff (\S+); rewrites per compiled graph (.*)", out)
    fsdp = re.search(r"FSDP2: .*max loss diff (\S+), max grad diff (\S+); rewrites per compiled graph (.*)", out)
    assert ddp and fsdp, out
    for match in (ddp, fsdp):
        assert float(match.group(1)) < 1e-4 and float(match.group(2)) < 1e-4
    ddp_graphs = ast.literal_eval(ddp.group(3))
    assert len(ddp_graphs) > 1 and sum(map(len, ddp_graphs)) >= 4  # cut into several graphs; 4 layers rewritten
