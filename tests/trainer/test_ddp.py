"""Two processes under torchrun (gloo, CPU): the replicas must end with identical weights even though
each rank trains on different batches, which only happens when gradients are all-reduced."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["gan", "pix2pix", "diffusion-student"])
def test_two_process_gloo_run_keeps_replicas_identical(family, tmp_path, tiny_repo):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    teacher = [str(tiny_repo / "exported" / "tiny-diffusion" / "1")] if family == "diffusion-student" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "trainer" / "ddp_worker.py"), family, str(run), *teacher]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    # different data on each rank: the per-rank losses differ while the weights agree
    assert ranks[0]["losses"] != ranks[1]["losses"]
    record = json.loads((run / "config.json").read_text())
    assert record["world_size"] == 2
    assert (run / "checkpoint.pt").exists()
