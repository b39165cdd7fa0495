"""CorDA (Yang et al. 2024, arXiv:2406.05223, §3): decompose W in the context of its inputs.

From the batches (model in eval mode, no gradients), every call of a target layer adds the
Gram matrix of its input X [tokens, in] scaled by its largest entry, ``X' = X / |max X|``:
``C = (1/calls) Σ X'ᵀ X'`` [in, in] (fp32; the input's own dtype with
``use_float16_for_covariance``). Then, with the smallest damping ``λ = 0.01·2^k · mean(diag C)``
for which ``‖(C + λI)(C + λI)⁻¹ − I‖ < 0.05``:

    U S V̂ᵀ = svd(W (C + λI))           W [out, in] fp32
    V = ((C + λI)⁻¹)ᵀ V̂                 so that W = U S Vᵀ

IPM (instruction-previewed, default) keeps the r largest triplets in the adapter, KPM
(knowledge-preserved) the r smallest: ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ`` and the base
becomes ``W − s·B A`` (`InitScheme.rewrites_base`; ship it like PiSSA, see
`lorafit.inits.conversion`). PEFT hooks its layers with one sequence per call (its hook squeezes
the batch dimension); lorafit flattens [batch, tokens] into tokens, the same for batches of one.
PEFT's ``cache_file`` / ``covariance_file`` are pickles and are refused; ``verbose`` and
``prune_temporary_fields`` only concern PEFT's progress output and module attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..registry import InitScheme
from .prepared import Preparation, Prepared, after_prepare, collect_inputs, keep_all, out_in, take
from .svd_base import check_decomposable


@dataclass
class CordaConfig:
    """PEFT's CordaConfig (see the module docstring)."""

    cache_file: Optional[str] = None
    covariance_file: Optional[str] = None
    corda_method: Literal["ipm", "kpm"] = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True


def input_covariances(preparation: Preparation) -> dict[str, Tensor]:
    """{path: C [in, in]} as defined in the module docstring."""
    keep_dtype = preparation.settings.use_float16_for_covariance
    sums: dict[str, Tensor] = {}
    calls: dict[str, int] = {}

    def add(path: str, x: Tensor, batch) -> None:
        x = x.reshape(-1, x.shape[-1])  # [tokens, in]
        x = x if keep_dtype else x.float()
        x = x / x.max().abs()
        if not torch.isfinite(x).all():
            raise ConfigError(f"CorDA: the input of {path!r} holds NaN/Inf (or is all zero)")
        sums[path] = sums[path] + x.T @ x if path in sums else x.T @ x
        calls[path] = calls.get(path, 0) + 1

    collect_inputs(preparation, add, "the input covariance of each layer")
    missing = [path for path, _ in preparation.targets if path not in sums]
    if missing:
        raise ConfigError(f"CorDA: the batches never reached {missing}")
    return {path: sums[path] / calls[path] for path in sums}


def corda_factors(weight: Tensor, covariance: Tensor, r: int, scaling: float, method: str
                  ) -> tuple[Tensor, Tensor]:
    """``(A [r, in], B [out, r])`` for W [out, in] and C [in, in] (fp32)."""
    covariance = covariance.float()
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    while True:
        damped = covariance + eye * covariance.diagonal().mean() * damp
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye) < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    V = (Vh @ inverse).T  # [in, min(out, in)]
    keep = slice(0, r) if method == "ipm" else slice(S.shape[0] - r, S.shape[0])
    root = (S[keep] / scaling).sqrt()
    return root[:, None] * V[:, keep].T, U[:, keep] * root


def prepare_corda(preparation: Preparation) -> LoraConfig:
    """Refuses PEFT's cache files here, not in `CordaConfig`: a PEFT adapter naming one still loads."""
    config, method = preparation.config, preparation.settings.corda_method
    for key in ("cache_file", "covariance_file"):
        if getattr(preparation.settings, key) is not None:
            raise ConfigError(f"LoraConfig.corda_config.{key} = {getattr(preparation.settings, key)!r}: lorafit does "
                              f"not read or write PEFT's CorDA cache files (pickles); leave it null")
    covariances = input_covariances(preparation)

    def factors(path: str, module: nn.Module) -> Prepared:
        weight = out_in(module, module.weight.detach()).float()
        s = config.scaling_for(path)
        A, B = corda_factors(weight, covariances[path], config.rank_for(path), s, method)
        return Prepared(path, A, B, s, weight=weight - s * (B @ A))

    return keep_all(preparation, factors)


CORDA = InitScheme("corda", take, spelling="'corda'", check_target=after_prepare(check_decomposable),
                   rewrites_base=True, settings="corda_config", settings_type=CordaConfig, prepare=prepare_corda)
