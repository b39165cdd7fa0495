import pytest
import torch

import peft.tuners.lora.layer as peft_layer

from lorafit.testing import tiny_llama

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def token_batches(count=3, rows=1, length=12, seed=1):
    """Causal-LM batches of random token ids (labels = the ids, as a causal LM trains)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, 500, (rows, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def relative(got, want):
    return float((got - want).detach().norm() / want.detach().norm())


@pytest.fixture
def base():
    return tiny_llama(hidden=32, layers=2, heads=4, intermediate=48)


@pytest.fixture
def seeded_svd_lowrank(monkeypatch):
    """Both libraries draw the same random start for every randomised SVD (a fixed seed per call)."""
    real = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(123)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded, raising=False)
