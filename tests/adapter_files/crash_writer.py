"""Saves two alternating adapters into one directory forever (run by test_atomic.py, then killed).

    python crash_writer.py DIR      # prints "ready" once the first save is complete
"""

import sys

import torch
from torch import nn

import lorafit

RANKS = (32, 64)
ALPHAS = (8, 32)


def two_states() -> lorafit.LoraModel:
    """One base with adapters "s0" and "s1" of different rank and alpha, deterministic."""
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
    model = lorafit.LoraModel(base)
    for k in range(2):
        torch.manual_seed(10 + k)
        model.add_adapter(f"s{k}", lorafit.LoraConfig(r=RANKS[k], lora_alpha=ALPHAS[k], init_lora_weights=False,
                                                      target_modules=["0", "1", "2", "3"]))
    return model


if __name__ == "__main__":
    model = two_states()
    step = 0
    while True:
        model.save_adapter(sys.argv[1], adapter_names=[f"s{step % 2}"])
        if step == 0:
            print("ready", flush=True)
        step += 1
