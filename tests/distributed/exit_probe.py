"""Run by test_dist_exit.py under torchrun: ``lorafit train CONFIG`` as the CLI runs it, and
print how many gloo threads this process ran just before the process group closed and how many
it runs after `train` returned."""

import os
import sys
import time

from lorafit.train import distributed, trainer
from lorafit.train.config import load_run_config


def gloo_threads() -> int:
    tasks = f"/proc/{os.getpid()}/task"
    return sum("gloo" in open(f"{tasks}/{t}/comm").read() for t in os.listdir(tasks))


running = []
close = distributed.close


def counting_close(group):
    running.append(gloo_threads())
    close(group)


def threads_left_after_close() -> int:
    """gloo threads still listed after `train` returned, allowing 2 s for the kernel to reap the
    ones the group's destructor joined: a joined thread can stay in /proc/PID/task for a moment
    (pthread_join returns when the thread clears its tid, before the kernel releases it); a group
    that was never freed keeps its threads running, and they stay."""
    deadline = time.monotonic() + 2.0
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return gloo_threads()


distributed.close = counting_close
trainer.train(load_run_config(sys.argv[1]))
print(f"rank {os.environ['RANK']}: {running[0]} gloo threads in the group, {threads_left_after_close()} after it "
      f"closed", flush=True)
sys.exit(0)
