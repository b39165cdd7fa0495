"""Shared data for the initialisation tests (a uniquely named module: importable from any test)."""

import torch

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
