"""``lora_bias``: a trainable bias on B, as PEFT defines it (`LoraConfig.lora_bias`).

PEFT's B is then ``nn.Linear(r, out, bias=True)``, so the adapter adds ``s · (B A x + b)`` with
b [out] (a per-channel bias on a convolution's 1×1 B). Merging adds ``s · b`` to the base bias,
so a base layer without a bias cannot be merged (PEFT warns when the adapter is created and
refuses at merge time; lorafit does the same). b starts at zero, so the adapter starts as the
identity under the default init. Stored as ``lora_B.bias``; not for embeddings, not with DoRA,
and only with ``init_lora_weights`` True or False (PEFT's rules).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MergeError
from ..layers import LoraLayer, LoraWeights
from ..registry import Variant, find_kind


class LoraBiasWeights(LoraWeights):
    """A [r, in], B [out, r] and the bias b [out] of B: ``ΔW = s · B A``, ``Δbias = s · b``."""

    fusable = False
    gatherable = False

    def __init__(self, A: Tensor, B: Tensor, scaling: float, dropout_p: float = 0.0):
        super().__init__(A, B, scaling, dropout_p)
        self.bias = nn.Parameter(torch.zeros(B.shape[0], dtype=A.dtype, device=A.device))

    def apply(self, layer: LoraLayer, x: Tensor, result: Tensor, result_is_base: bool) -> Tensor:
        out = layer.lora_output(self.dropped(x), self)  # s·B A x   [..., out]
        return result + (out + layer.per_output(self.scaling * self.bias, out)).to(result.dtype)

    def merge(self, layer: LoraLayer, safe: bool) -> None:
        bias = _base_bias(layer)
        delta = self.scaling * self.bias.detach().float()
        if safe and not bool(torch.isfinite(delta).all()):
            raise MergeError("the adapter's bias holds NaN/Inf; the base was left untouched")
        super().merge(layer, safe)
        with torch.no_grad():
            bias.copy_((bias.float() + delta).to(bias.dtype))

    def unmerge(self, layer: LoraLayer) -> None:
        super().unmerge(layer)
        bias = _base_bias(layer)
        with torch.no_grad():
            bias.copy_((bias.float() - self.scaling * self.bias.detach().float()).to(bias.dtype))


def _base_bias(layer: LoraLayer) -> Tensor:
    bias = getattr(layer.base_layer, "bias", None)
    if bias is None:
        raise MergeError(f"lora_bias = True cannot be merged into a {type(layer.base_layer).__name__} that "
                         "has no bias")
    return bias


def check_target(config, name: str, module: nn.Module) -> None:
    """Refuse embeddings and inits other than True/False; warn that a bias-less base cannot merge."""
    what = f"LoraConfig.lora_bias = True cannot apply to {name!r} ({type(module).__name__})"
    if config.init_lora_weights not in (True, False):
        raise ConfigError(f"LoraConfig.lora_bias = True needs init_lora_weights True or False, "
                          f"got {config.init_lora_weights!r}")
    if find_kind(module).name == "embedding":
        raise ConfigError(f"{what}: PEFT defines lora_bias for linear and convolution layers only")
    if getattr(module, "bias", None) is None:
        warnings.warn(f"{what.replace('cannot apply to', 'on')} has no base bias: the adapter trains, "
                      "but merging it will be refused")


VARIANT = Variant("lora_bias", LoraBiasWeights, tensor_keys={"bias": "lora_B.bias"},
                  check_target=check_target, excludes=("use_dora",))
