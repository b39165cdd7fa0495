"""Pure LoRA math on tensors: no modules, no state.

Shapes follow PEFT: A [r, in] (or [r, in/groups, *kernel] for convolutions), B [out, r]
(or [out, r, 1, ...]), scaling s a float. The weight update is ``ΔW = s · B A`` (Hu et al. 2021, §4.1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``ΔW = s · B A`` in fp32, shaped like the base weight ([out, in] or [out, in, *kernel]).

    For a convolution B is a 1×1 kernel, so ``ΔW[o, i, k…] = s Σ_r B[o, r] A[r, i, k…]``.
    The product is formed in fp32 so a merge into a bf16/fp16 weight rounds only once.
    """
    r = A.shape[0]
    b2 = B.reshape(B.shape[0], r).float()
    a2 = A.reshape(r, -1).float()
    return (scaling * (b2 @ a2)).reshape(B.shape[0], *A.shape[1:])


def merge_into(weight: Tensor, delta: Tensor, sign: float = 1.0, safe: bool = False) -> bool:
    """``W ← W + sign · ΔW`` in place, computed in fp32 and rounded once to W's dtype.

    With `safe`, a ΔW holding NaN/Inf leaves W untouched and the call returns False.
    """
    if safe and not bool(torch.isfinite(delta).all()):
        return False
    with torch.no_grad():
        weight.copy_((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))
    return True


def lora_linear_delta(x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``s · (x Aᵀ) Bᵀ`` for x [..., in] -> [..., out]; the scale multiplies the rank-r middle."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, A) * scaling, B)
