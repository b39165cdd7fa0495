"""PiSSA (Meng et al. 2024, arXiv:2404.02948, §3): the top-r singular triplets of W become the
adapter, the rest stays in the base (see `lorafit.inits.svd_base`).

``W = U S Vᵀ``; with the top-r triplets and ``S' = S_r / s``: ``B = U_r √S'`` [out, r],
``A = √S' V_rᵀ`` [r, in], so ``s·B A = U_r S_r V_rᵀ``. ``"pissa_niter_K"`` uses the randomised
``torch.svd_lowrank(W, q=r, niter=K)`` (§4.4, fast SVD): much faster on large W, approximately
the same subspace, and it draws from torch's RNG.
"""

from __future__ import annotations

import re

import torch

from ..layers import LoraLayer, LoraWeights
from ..registry import InitScheme
from .svd_base import check_decomposable, write_residual


def pissa_init(layer: LoraLayer, w: LoraWeights, value: str) -> None:
    r, wf = w.rank, layer.weight_view().detach().float()
    niter = re.fullmatch(r"pissa_niter_(\d+)", value)
    if niter is None:
        U, S, Vh = torch.linalg.svd(wf, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(wf, q=r, niter=int(niter.group(1)))
        Vh = V.T
    root = torch.sqrt(S / w.scaling)  # [r]
    write_residual(layer, w, root[:, None] * Vh, U * root[None, :])


PISSA = InitScheme(r"pissa(_niter_\d+)?", pissa_init, spelling="'pissa', 'pissa_niter_K' (K an integer)",
                   check_target=check_decomposable, rewrites_base=True)
