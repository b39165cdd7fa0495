"""A process leaves its process group for good: no gloo thread outlives `distributed.close`.

torch.distributed.nn binds the default group as a default argument value when it is imported;
imported after the group exists (transformers imports it through FSDP when it loads a model),
it kept the group alive after ``destroy_process_group``, and the group's threads ran on into
interpreter shutdown, where tearing them down now and then aborted a worker (SIGABRT)."""

import re
import subprocess
import sys
from pathlib import Path

from dist_support import REPO, linux_only, worker_env

PROBE = Path(__file__).with_name("exit_probe.py")


@linux_only
def test_no_gloo_thread_outlives_the_process_group():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=0.1", str(PROBE)], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = sorted(re.findall(r"rank (\d): (\d+) gloo threads in the group, (\d+) after it closed", proc.stdout))
    assert [rank for rank, _, _ in counts] == ["0", "1"], proc.stdout
    assert all(int(during) > 0 and int(after) == 0 for _, during, after in counts), proc.stdout
