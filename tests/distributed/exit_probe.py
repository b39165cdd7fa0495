"""Run by test_dist_exit.py under torchrun: ``lorafit train CONFIG`` as the CLI runs it, and
print how many gloo threads this process ran just before the process group closed and how many
it runs after `train` returned."""

import os
import sys

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


distributed.close = counting_close
trainer.train(load_run_config(sys.argv[1]))
print(f"rank {os.environ['RANK']}: {running[0]} gloo threads in the group, {gloo_threads()} after it closed",
      flush=True)
sys.exit(0)
