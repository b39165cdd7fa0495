import pytest
import torch

import peft.tuners.lora.layer as peft_layer

from lorafit.testing import tiny_llama


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
