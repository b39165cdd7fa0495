"""OLoRA (Büyükakyüz 2024, arXiv:2406.01775): ``W = Q R``; ``B = Q[:, :r]`` (orthonormal
columns), ``A = R[:r]``, and the base keeps the residual (see `lorafit.inits.svd_base`)."""

from __future__ import annotations

import torch

from ..layers import LoraLayer, LoraWeights
from ..registry import InitScheme
from .svd_base import check_decomposable, write_residual


def olora_init(layer: LoraLayer, w: LoraWeights, value: str) -> None:
    Q, R = torch.linalg.qr(layer.weight_view().detach().float())
    write_residual(layer, w, R[: w.rank], Q[:, : w.rank])


OLORA = InitScheme("olora", olora_init, spelling="'olora'", check_target=check_decomposable, rewrites_base=True)
