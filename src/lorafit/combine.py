"""Combining adapters into a new one: ``ΔW_new ≈ Σ_i w_i ΔW_i`` per layer.

Each adapter i on a layer contributes ``ΔW_i = s_i B_i A_i``. The methods:

- ``cat`` (exact): stack the factors, ``A = [A_1; …; A_n]`` [Σr_i, in] and
  ``B = [w_1 s_1 B_1, …, w_n s_n B_n]`` [out, Σr_i], scaling 1, so ``B A = Σ w_i s_i B_i A_i``.
  Works for any mix of ranks, alphas, rsLoRA and per-module rank/alpha patterns.
- ``svd``: the best rank-k approximation (Eckart–Young) of the exact weighted ΔW; the relative
  Frobenius error ``‖ΔW − ΔW_k‖ / ‖ΔW‖ = sqrt(Σ_{j>k} σ_j²) / sqrt(Σ_j σ_j²)`` is reported.
- ``linear``: same-rank adapters only, ``A = Σ c_i A_i``, ``B = Σ c_i B_i`` with
  ``c_i = sign(w_i s_i)·sqrt(|w_i s_i|)`` on A and ``sqrt(|w_i s_i|)`` on B. This is NOT the
  weighted delta: the product has cross terms ``c_i c_j B_i A_j``. It keeps the rank small and is
  what some merging recipes expect; use ``cat`` or ``svd`` when the maths must hold.

Adapters whose maths is not ``s B A`` (DoRA's normalised magnitude) or that carry
modules_to_save copies cannot be combined exactly and are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .config import LoraConfig
from .errors import AdapterError
from .layers import LoraWeights

METHODS = ("cat", "svd", "linear")


@dataclass
class CombineReport:
    """What `combine` did: method, ranks per module, and (svd) the relative error it made."""

    method: str
    ranks: dict[str, int] = field(default_factory=dict)
    relative_error: float = 0.0
    discarded_energy: float = 0.0


def cat_factors(parts: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """Exact combination of ``(A_i, B_i, c_i)`` with ``c_i = w_i s_i``: returns (A, B) with
    ``B A = Σ c_i B_i A_i`` (to be used with scaling 1)."""
    A = torch.cat([a for a, _, _ in parts], dim=0)
    B = torch.cat([b * c for _, b, c in parts], dim=1)
    return A, B


def weighted_delta(parts: Sequence[tuple[Tensor, Tensor, float]]) -> Tensor:
    """``Σ c_i B_i A_i`` in fp32 as an [out, in·k] matrix."""
    A, B = cat_factors([(a.float(), b.float(), c) for a, b, c in parts])
    r = A.shape[0]
    return B.reshape(B.shape[0], r) @ A.reshape(r, -1)


def svd_factors(parts: Sequence[tuple[Tensor, Tensor, float]], rank: int) -> tuple[Tensor, Tensor, float, float]:
    """Rank-`rank` factors of the exact weighted ΔW, plus (discarded σ² sum, total σ² sum)."""
    a0, b0, _ = parts[0]
    delta = weighted_delta(parts)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.shape[0])
    B = (U[:, :k] * S[:k]).reshape(b0.shape[0], k, *b0.shape[2:])
    A = Vh[:k].reshape(k, *a0.shape[1:])
    if k < rank:  # pad to the requested rank so every module has the same r
        A = torch.cat([A, A.new_zeros(rank - k, *A.shape[1:])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k, *B.shape[2:])], dim=1)
    energy = S.double().pow(2)
    return A.to(a0.dtype), B.to(b0.dtype), float(energy[k:].sum()), float(energy.sum())


def linear_factors(parts: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """``A = Σ sign(c_i)·sqrt|c_i|·A_i``, ``B = Σ sqrt|c_i|·B_i`` (see the module docstring)."""
    ranks = {a.shape[0] for a, _, _ in parts}
    if len(ranks) != 1:
        raise AdapterError(f"method 'linear' needs adapters of one rank on each module, got ranks {sorted(ranks)}")
    A = sum(math.copysign(math.sqrt(abs(c)), c) * a for a, _, c in parts)
    B = sum(math.sqrt(abs(c)) * b for _, b, c in parts)
    return A, B


def combine(model, weights: Mapping[str, float], name: str, method: str = "cat",
            rank: Optional[int] = None) -> CombineReport:
    """Add adapter `name` to `model` (a LoraModel) combining `weights` {adapter: w} by `method`."""
    if method not in METHODS:
        raise AdapterError(f"combine: method {method!r} is unknown; expected one of {list(METHODS)}")
    if not weights:
        raise AdapterError("combine: no adapters given")
    if method == "svd" and (not isinstance(rank, int) or rank <= 0):
        raise AdapterError(f"combine: method 'svd' needs a positive integer rank, got {rank!r}")
    for adapter in weights:
        model._check_known(adapter)
        config = model.peft_config[adapter]
        if config.modules_to_save:
            raise AdapterError(f"combine: adapter {adapter!r} has modules_to_save copies, which have no exact combination")
    if name in model.peft_config:
        raise AdapterError(f"combine: an adapter named {name!r} already exists")

    template = model.peft_config[next(iter(weights))]
    report = CombineReport(method)
    new_weights: dict[str, LoraWeights] = {}
    discarded = total = 0.0
    for path, layer in model.lora_layers():
        parts = []
        for adapter, w in weights.items():
            if adapter not in layer.lora:
                continue
            lw = layer.lora[adapter]
            if type(lw) is not LoraWeights:
                raise AdapterError(f"combine: adapter {adapter!r} on {path!r} is a {type(lw).__name__} "
                                   "(e.g. DoRA), whose update is not s·B·A; it cannot be combined exactly")
            parts.append((lw.A.detach(), lw.B.detach(), float(w) * lw.scaling))
        if not parts:
            continue
        if method == "cat":
            A, B = cat_factors(parts)
        elif method == "linear":
            A, B = linear_factors(parts)
        else:
            A, B, lost, energy = svd_factors(parts, rank)
            discarded, total = discarded + lost, total + energy
        new_weights[path] = LoraWeights(A.clone(), B.clone(), 1.0, template.lora_dropout)
        report.ranks[path] = A.shape[0]
    if method == "svd":
        report.discarded_energy = discarded
        report.relative_error = math.sqrt(discarded / total) if total > 0 else 0.0

    model.add_adapter_weights(name, _config_for(report.ranks, template), new_weights)
    return report


def _config_for(ranks: Mapping[str, int], template: LoraConfig) -> LoraConfig:
    """A PEFT-style config whose scaling is 1 on every module: lora_alpha = r per module."""
    r = max(ranks.values())
    pattern = {re.escape(path): rk for path, rk in ranks.items() if rk != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern), task_type=template.task_type,
                      base_model_name_or_path=template.base_model_name_or_path,
                      lora_dropout=template.lora_dropout, init_lora_weights=False)
