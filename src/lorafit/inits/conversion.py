"""Shipping a PiSSA / OLoRA adapter as a plain LoRA for users of the *original* base.

Those schemes rewrite the base to ``W_res = W − s·B₀ A₀`` (`lorafit.inits.svd_base`). Keep the
initial factors A₀, B₀ (`snapshot_factors`) and use ``ΔW = s·(B A − B₀ A₀) = s·[B, −B₀] [A; A₀]``:
a plain adapter of rank 2r (`to_plain_lora`; `plain_lora_config` keeps s by doubling alpha, or
scaling it by √2 with rsLoRA).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import LoraConfig


def snapshot_factors(model, adapter_name: str = "default") -> dict[str, tuple[Tensor, Tensor]]:
    """{module path: (A₀, B₀)} copies of an adapter's factors; take it right after `wrap`."""
    return {path: (layer.lora[adapter_name].A.detach().clone(), layer.lora[adapter_name].B.detach().clone())
            for path, layer in model.lora_layers() if adapter_name in layer.lora}


def to_plain_lora(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of rank 2r with ``B' A' = B A − B₀ A₀``: ``A' = [A; A₀]`` [2r, in],
    ``B' = [B, −B₀]`` [out, 2r]. Applied to the *original* W with the same scale s (see
    `plain_lora_config`) they give ``W + s(BA − B₀A₀) = W_res + s·B A``, the trained layer."""
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)


def plain_lora_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r plain adapter from `to_plain_lora`: r, rank_pattern doubled and
    alpha scaled so s is unchanged (×2 for alpha/r, ×√2 for rsLoRA's alpha/√r)."""
    factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(
        r=2 * config.r, lora_alpha=config.lora_alpha * factor, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})


def plain_lora_factors(model, adapter_name: str, initial: dict[str, tuple[Tensor, Tensor]]
                       ) -> dict[str, tuple[Tensor, Tensor]]:
    """{module path: (A', B')} of the plain rank-2r adapter for every layer of `adapter_name`,
    given the `snapshot_factors` taken at initialisation."""
    out = {}
    for path, layer in model.lora_layers():
        if adapter_name in layer.lora:
            w = layer.lora[adapter_name]
            A0, B0 = initial[path]
            out[path] = to_plain_lora(w.A.detach(), w.B.detach(), A0.to(w.A), B0.to(w.B))
    return out
