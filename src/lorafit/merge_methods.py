"""Merge rules for task tensors: weighted sum, TIES-Merging, DARE and magnitude pruning.

A merge rule turns n tensors of one shape ``t_1 … t_n`` and weights ``w_1 … w_n`` into one tensor
of that shape. `lorafit.combine` applies a rule to LoRA factors or to whole updates ΔW; these are
the definitions PEFT's ``add_weighted_adapter`` uses (``peft.utils.merge_utils``), so the same
inputs (and, for DARE, the same random masks) give the same result.

- ``linear``: ``Σ w_i t_i``.
- ``magnitude_prune``: ``Σ w_i M_k(t_i)``, where ``M_k`` keeps the ``k = ⌊density · numel⌋``
  entries of largest ``|t|`` and zeroes the rest.
- ``ties`` (Yadav et al. 2023, TIES-Merging, §3): trim ``p_i = M_k(t_i)``; elect a sign per entry,
  ``σ = sign(Σ_i p_i)`` (``total``) or ``sign(Σ_i sign(p_i))`` (``frequency``), with 0 counting as
  +; disjoint mean ``Σ_i [sign(p_i) = σ] w_i p_i / max(1, Σ_i [sign(p_i) = σ])``. The sign is
  elected on the unweighted tensors; pruned (zero) entries never count.
- ``dare_linear`` (Yu et al. 2024, DARE, §3): drop each entry with probability ``1 − density``
  and rescale the kept ones, ``p_i = t_i ⊙ m_i / density`` with ``m_i ~ Bernoulli(density)``;
  then ``Σ w_i p_i``. ``E[p_i] = t_i``.
- ``dare_ties``: DARE's ``p_i``, then TIES' sign election and disjoint mean.

``density`` is the kept fraction in (0, 1]; at 1 nothing is pruned (and DARE draws no mask).
Random masks are drawn with ``torch.bernoulli`` on each tensor in order, from `generator` or,
when it is None, from torch's global generator (as PEFT does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .errors import AdapterError

SIGN_METHODS = ("total", "frequency")

# (tensors, weights, density, majority_sign_method, generator) -> merged tensor
Rule = Callable[[Sequence[Tensor], Sequence[float], float, str, Optional[torch.Generator]], Tensor]


def magnitude_mask(tensor: Tensor, density: float) -> Tensor:
    """``M_k(t)``: `tensor` with all but its ``k = ⌊density · numel⌋`` largest-magnitude entries
    set to 0 (any shape; ties in magnitude are broken by ``torch.topk``)."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[tensor.abs().reshape(-1).topk(int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def random_drop(tensor: Tensor, density: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """DARE's drop-and-rescale: ``t ⊙ m / density`` with ``m ~ Bernoulli(density)`` per entry."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def elected_sign_mask(stacked: Tensor, method: str) -> Tensor:
    """For stacked tensors [n, …]: ``[sign(p_i) = σ]`` [n, …] with σ elected per entry by
    `method` (``total``: sign of the sum; ``frequency``: sign of the sum of signs; 0 → +)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1.0, -1.0)


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ w_i t_i`` in fp32."""
    return sum(float(w) * t.float() for t, w in zip(tensors, weights))


def disjoint_mean(tensors: Sequence[Tensor], weights: Sequence[float], method: str) -> Tensor:
    """TIES' elect-and-average: ``Σ_i [sign(t_i) = σ] w_i t_i / max(1, Σ_i [sign(t_i) = σ])``."""
    stacked = torch.stack([t.float() for t in tensors])  # [n, …]
    agree = elected_sign_mask(stacked, method)
    scale = torch.tensor([float(w) for w in weights], device=stacked.device).reshape(-1, *[1] * (stacked.dim() - 1))
    return (stacked * scale * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def linear(tensors, weights, density, method, generator) -> Tensor:
    """``Σ w_i t_i``."""
    return weighted_sum(tensors, weights)


def magnitude_prune(tensors, weights, density, method, generator) -> Tensor:
    """``Σ w_i M_k(t_i)``."""
    return weighted_sum([magnitude_mask(t, density) for t in tensors], weights)


def ties(tensors, weights, density, method, generator) -> Tensor:
    """TIES: disjoint mean of the trimmed ``M_k(t_i)``."""
    return disjoint_mean([magnitude_mask(t, density) for t in tensors], weights, method)


def dare_linear(tensors, weights, density, method, generator) -> Tensor:
    """``Σ w_i t_i ⊙ m_i / density``."""
    return weighted_sum([random_drop(t, density, generator) for t in tensors], weights)


def dare_ties(tensors, weights, density, method, generator) -> Tensor:
    """TIES' disjoint mean of DARE's ``t_i ⊙ m_i / density``."""
    return disjoint_mean([random_drop(t, density, generator) for t in tensors], weights, method)


@dataclass(frozen=True)
class MergeRule:
    """A rule and what it needs: a density (`prunes`), a sign method (`elects_sign`), random
    draws (`random`)."""

    merge: Rule
    prunes: bool = False
    elects_sign: bool = False
    random: bool = False

    def check(self, method: str, density: Optional[float], majority_sign_method: str) -> None:
        """Refuse a missing or out-of-range density, or an unknown sign method, naming `method`."""
        if self.prunes and (isinstance(density, bool) or not isinstance(density, (int, float))
                            or not 0 < density <= 1):
            raise AdapterError(f"combine: method {method!r} needs density, the kept fraction in (0, 1]; "
                               f"got {density!r}")
        if self.elects_sign and majority_sign_method not in SIGN_METHODS:
            raise AdapterError(f"combine: majority_sign_method must be one of {list(SIGN_METHODS)}, "
                               f"got {majority_sign_method!r}")


RULES: dict[str, MergeRule] = {
    "linear": MergeRule(linear),
    "magnitude_prune": MergeRule(magnitude_prune, prunes=True),
    "ties": MergeRule(ties, prunes=True, elects_sign=True),
    "dare_linear": MergeRule(dare_linear, prunes=True, random=True),
    "dare_ties": MergeRule(dare_ties, prunes=True, elects_sign=True, random=True),
}
