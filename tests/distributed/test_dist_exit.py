"""A process leaves its process group for good: no gloo thread outlives a distributed run.

A group that something still holds after ``destroy_process_group`` keeps its threads running into
interpreter shutdown, where a thread that drops the last reference to a collective's tensor is
ended for want of the GIL, which now and then aborted a worker (SIGABRT) after its work was done.
Two holders were found: torch.distributed.nn, which binds the default group as a default argument
value when imported after the group exists (transformers imports it through FSDP), and under FSDP
the device mesh, kept by the sharded model and by DTensor's sharding-propagation cache."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from dist_support import REPO, linux_only, worker_env, write_config

PROBE = Path(__file__).with_name("exit_probe.py")


@linux_only
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_no_gloo_thread_outlives_a_distributed_run(mode, tmp_path, dist_config):
    config = write_config(tmp_path / "c.yaml", dist_config(tmp_path / "run", train={
        "max_steps": 2, "distributed": mode, "eval_every": None, "save_every": None}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=0.1", str(PROBE), str(config)], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = sorted(re.findall(r"rank (\d): (\d+) gloo threads in the group, (\d+) after it closed", proc.stdout))
    assert [rank for rank, _, _ in counts] == ["0", "1"], proc.stdout
    assert all(int(during) > 0 and int(after) == 0 for _, during, after in counts), proc.stdout
