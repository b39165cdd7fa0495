"""``"orthogonal"``: A and B both non-zero with ``B A = 0`` at start, as PEFT defines it.

With Q [r, r] the orthogonal factor of the QR decomposition of an N(0, 1) matrix, its even rows
``Q_o = Q[0::2]`` and odd rows ``Q_e = Q[1::2]`` ([r/2, r] each) are orthonormal and mutually
orthogonal (``Q_e Q_oᵀ = 0``). Then

    A = (G_a Q_o)ᵀ / 10        G_a ~ N(0, 1) [in, r/2]   ->  A [r, in],  rows in span(Q_oᵀ)
    B = G_bᵀ Q_e / 10          G_b ~ N(0, 1) [r/2, out]  ->  B [out, r], rows in span(Q_e)

so ``B A = G_bᵀ Q_e Q_oᵀ G_aᵀ / 100 = 0``: the model is unchanged at step 0, yet both factors get
gradients from the first step (with B = 0, A gets none). The rank must be even. The three
matrices are drawn from torch's RNG in PEFT's order (Q's matrix, G_a, G_b), so a seed gives
PEFT's factors. Linear layers only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import LoraLayer, LoraWeights
from ..registry import InitScheme, find_kind


def orthogonal_init(layer: LoraLayer, w: LoraWeights, value: str) -> None:
    r = w.rank
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = (torch.randn(layer.in_features, r // 2) @ Q[0::2]).T / 10.0  # [r, in]
    B = torch.randn(r // 2, layer.out_features).T @ Q[1::2] / 10.0  # [out, r]
    with torch.no_grad():
        w.A.copy_(A)
        w.B.copy_(B)


def check_target(config, name: str, module: nn.Module) -> None:
    """Refuse an odd rank or a non-linear module, naming the module."""
    r = config.rank_for(name)
    what = f"LoraConfig.init_lora_weights = 'orthogonal' cannot apply to {name!r} ({type(module).__name__})"
    if r % 2:
        raise ConfigError(f"{what}: the rank must be even, got {r}")
    if not find_kind(module).linear:
        raise ConfigError(f"{what}: only linear layers are supported")


ORTHOGONAL = InitScheme("orthogonal", orthogonal_init, spelling="'orthogonal'", check_target=check_target)
