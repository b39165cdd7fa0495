"""Initialisations that move the base weight's principal part into the adapter.

Both write the factors from a decomposition of the layer's weight W [out, in] (fp32), then
replace the base weight by the residual so the model's output is unchanged at step 0:

    W_res = W − s · B A          (W_res + s · B A = W)

* PiSSA (Meng et al. 2024, arXiv:2404.02948, §3): ``W = U S Vᵀ``; with the top-r triplets and
  ``S' = S_r / s``: ``B = U_r √S'`` [out, r], ``A = √S' V_rᵀ`` [r, in], so ``s·B A = U_r S_r V_rᵀ``.
  ``"pissa_niter_K"`` uses the randomised ``torch.svd_lowrank(W, q=r, niter=K)`` (§4.4, fast
  SVD): much faster on large W, approximately the same subspace, and it draws from torch's RNG.
* OLoRA (Büyükakyüz 2024, arXiv:2406.01775): ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``.

The adapter then only makes sense with the modified base. To ship it as a plain LoRA for users of
the *original* base, keep the initial factors A₀, B₀ (`snapshot_factors`) and use
``ΔW = s·(B A − B₀ A₀) = s·[B, −B₀] [A; A₀]``: a plain adapter of rank 2r (`to_plain_lora`,
`plain_lora_config` keeps s by doubling alpha, or scaling it by √2 with rsLoRA).

Refused (ConfigError when the adapter is added): a quantised base (the residual would have to be
re-quantised; PEFT dequantises and re-quantises, we do not), Embedding/Conv layers, and r larger
than min(out, in).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..layers import LoraLayer, LoraLinear, LoraWeights, find_kind
from ..quant import is_quantized_linear

_NITER = re.compile(r"pissa_niter_(\d+)")


def _svd_scheme(scheme) -> bool:
    return isinstance(scheme, str) and (scheme in ("pissa", "olora") or _NITER.fullmatch(scheme) is not None)


def _prepare(layer: LoraLayer, scheme: str) -> Tensor:
    if not isinstance(layer, LoraLinear) or is_quantized_linear(layer.base_layer):
        raise ConfigError(f"init_lora_weights={scheme!r} needs a full-precision linear base, "
                          f"not {type(layer.base_layer).__name__}")
    return layer.weight_view()


def _write(layer: LoraLayer, w: LoraWeights, weight: Tensor, A: Tensor, B: Tensor) -> None:
    """Store the factors and ``W ← W − s·B A`` (computed in fp32, rounded once)."""
    with torch.no_grad():
        w.A.copy_(A)
        w.B.copy_(B)
        weight.copy_((weight.float() - w.scaling * (B @ A)).to(weight.dtype))


def pissa_init(layer: LoraLayer, w: LoraWeights, scheme: str) -> None:
    """PiSSA: the top-r singular triplets of W become the adapter, the rest stays in the base."""
    weight = _prepare(layer, scheme)
    r, wf = w.rank, weight.detach().float()
    niter = _NITER.fullmatch(scheme)
    if niter is None:
        U, S, Vh = torch.linalg.svd(wf, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(wf, q=r, niter=int(niter.group(1)))
        Vh = V.T
    root = torch.sqrt(S / w.scaling)  # [r]
    _write(layer, w, weight, root[:, None] * Vh, U * root[None, :])


def olora_init(layer: LoraLayer, w: LoraWeights, scheme: str) -> None:
    """OLoRA: ``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r]`` of ``W = Q R``."""
    weight = _prepare(layer, scheme)
    Q, R = torch.linalg.qr(weight.detach().float())
    _write(layer, w, weight, R[: w.rank], Q[:, : w.rank])


INIT_FUNCTIONS = {"pissa": pissa_init, "olora": olora_init}


def check_target(config: LoraConfig, name: str, module: nn.Module) -> None:
    """Refuse PiSSA/OLoRA where they cannot work, naming the module."""
    scheme = config.init_lora_weights
    if not _svd_scheme(scheme):
        return
    kind = find_kind(module)
    what = f"LoraConfig.init_lora_weights = {scheme!r} cannot apply to {name!r} ({type(module).__name__})"
    if is_quantized_linear(module):
        raise ConfigError(f"{what}: the base is quantised. Initialise PiSSA/OLoRA on the full-precision "
                          "model, then quantise the residual base, or use init_lora_weights=True")
    if kind is None or not kind.linear:
        raise ConfigError(f"{what}: only linear layers (nn.Linear, Conv1D) are supported")
    r = config.rank_for(name)
    weight = module.weight
    if min(weight.shape) < r:
        raise ConfigError(f"{what}: rank {r} exceeds min(out, in) = {min(weight.shape)}")


# -- converting to a plain LoRA ---------------------------------------------------------------


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
