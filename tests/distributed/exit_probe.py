"""Run by test_dist_exit.py under torchrun: join the process group as ``lorafit train`` does,
import FSDP as transformers does when it first loads a model, leave the group, and print how many
gloo threads this process still runs."""

import os
import sys

from lorafit.train import distributed
from lorafit.train.config import TrainConfig


def gloo_threads() -> int:
    tasks = f"/proc/{os.getpid()}/task"
    return sum("gloo" in open(f"{tasks}/{t}/comm").read() for t in os.listdir(tasks))


with distributed.session(TrainConfig(distributed="ddp")) as group:
    import torch.distributed.fsdp  # noqa: F401

    running = gloo_threads()
print(f"rank {group.rank}: {running} gloo threads in the group, {gloo_threads()} after it closed", flush=True)
sys.exit(0)
