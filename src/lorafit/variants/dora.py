"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is a trainable magnitude per output row times a unit direction (eq. 5):

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row          m [out]; the norm runs over the input dim

m starts at ``‖W + s·B A‖_row`` (= ‖W‖_row when B = 0), so W' = W at initialisation. As §4.3
suggests, the norm is a constant for the backward pass (detached): gradients reach m, A and B
only through the numerator. With ``f = m / ‖W + s·B A‖_row`` [out] the layer computes

    y = W' x + b = (W x + b) + (f − 1) ⊙ W x + f ⊙ s·B A x

and `DoraWeights.apply` adds the last two terms to the base output it is handed. With dropout
active (training, lora_dropout > 0) both added terms see dropout(x) and ``W dropout(x)`` is
recomputed, as PEFT does; otherwise ``W x`` is the base output minus the bias.

W is always the base weight *without* merged adapters (`unmerged_weight`), so a forward with
several active adapters, any of them merged or not, and a merge of all of them agree.
Supported on linear kinds (nn.Linear, HF Conv1D, bitsandbytes 4/8-bit bases); Embedding and
convolutions are refused when the adapter is added (`check_target`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MergeError
from ..functional import merge_into
from ..kinds.linear import LoraLinear
from ..layers import LoraLayer, LoraWeights
from ..registry import Variant, find_kind


class DoraWeights(LoraWeights):
    """LoRA factors A [r, in], B [out, r] plus the DoRA magnitude ``m`` [out]."""

    fusable = False
    gatherable = False

    def __init__(self, A: Tensor, B: Tensor, scaling: float, dropout_p: float = 0.0):
        super().__init__(A, B, scaling, dropout_p)
        self.magnitude = nn.Parameter(torch.ones(B.shape[0], dtype=A.dtype, device=A.device))
        self._merged_factor: Optional[Tensor] = None  # f at merge time, so unmerge is exact

    def init_from_layer(self, layer: LoraLayer) -> None:
        """``m ← ‖W + s·B A‖_row`` for the layer's (dequantised, unmerged) base weight W."""
        if not isinstance(layer, LoraLinear):
            raise ConfigError(f"DoRA is supported on linear layers only, not on {type(layer).__name__}")
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm(unmerged_weight(layer)))

    def weight_norm(self, weight: Tensor) -> Tensor:
        """``‖W + s·B A‖₂`` per output row, fp32 [out], detached (§4.3)."""
        return torch.linalg.norm(weight.detach().float() + self.delta().detach(), dim=1)

    def factor(self, weight: Tensor) -> Tensor:
        """``f = m / ‖W + s·B A‖_row``, fp32 [out]; differentiable in m only."""
        return self.magnitude.float() / self.weight_norm(weight)

    def update(self, layer: LoraLayer) -> Tensor:
        """``W' − W = (f − 1) ⊙ W + f ⊙ s·B A``: what merging adds to the base, fp32 [out, in]."""
        weight = unmerged_weight(layer)
        return self._update(weight, self.factor(weight).detach())

    def _update(self, weight: Tensor, f: Tensor) -> Tensor:
        return (f - 1)[:, None] * weight + f[:, None] * self.delta().detach()

    def apply(self, layer: LoraLayer, x: Tensor, result: Tensor, result_is_base: bool) -> Tensor:
        weight = unmerged_weight(layer)  # [out, in] fp32
        f = self.factor(weight)  # [out]
        xd = self.dropped(x)
        lora = layer.lora_output(xd, self)  # s·B A xd   [..., out]
        if result_is_base and not self.dropping:
            bias = getattr(layer.base_layer, "bias", None)
            base = result if bias is None else result - bias.to(result.dtype)
        else:
            base = F.linear(xd.to(weight.dtype), weight).to(result.dtype)  # W xd   [..., out]
        return result + ((f - 1) * base + f * lora).to(result.dtype)

    def merge(self, layer: LoraLayer, safe: bool) -> None:
        """``W ← W + (f − 1) ⊙ W₀ + f ⊙ ΔW`` (= ``f ⊙ (W₀ + ΔW)`` when nothing else is merged)."""
        weight = unmerged_weight(layer)
        f = self.factor(weight).detach()
        if not merge_into(layer.weight_view(), self._update(weight, f), 1.0, safe):
            raise MergeError("the DoRA update holds NaN/Inf; the base weight was left untouched")
        self._merged_factor = f

    def unmerge(self, layer: LoraLayer) -> None:
        """Subtract exactly what `merge` added, using the factor f cached at merge time."""
        f = self._merged_factor
        if f is None:
            raise MergeError("this DoRA adapter is not merged")
        merge_into(layer.weight_view(), self._update(unmerged_weight(layer, also=self), f), -1.0)
        self._merged_factor = None


def unmerged_weight(layer: LoraLayer, also: Optional[DoraWeights] = None) -> Tensor:
    """W₀: the layer's base weight [out, in] in fp32 with every merged adapter (and `also`)
    taken out.

    Merged updates add up: a plain adapter adds ΔW_j, a DoRA one ``(f_j − 1) ⊙ W₀ + f_j ⊙ ΔW_j``,
    so ``W = c ⊙ W₀ + E`` with ``c = 1 + Σ (f_j − 1)`` and ``E = Σ ΔW_j or f_j ⊙ ΔW_j``, solved
    row by row. Without merged adapters this is the base weight itself (no copy for fp32)."""
    weight = layer.weight_view().detach().float()
    merged = [layer.lora[n] for n in layer.merged] + ([also] if also is not None else [])
    if not merged:
        return weight
    c = torch.ones(weight.shape[0], device=weight.device)
    extra = torch.zeros_like(weight)
    for w in merged:
        f = getattr(w, "_merged_factor", None)
        if f is None:
            extra += w.delta().detach().to(weight.device)
        else:
            c += f - 1
            extra += f[:, None] * w.delta().detach()
    return (weight - extra) / c[:, None]


def check_target(config, name: str, module: nn.Module) -> None:
    """Refuse ``use_dora`` on a module that is not a linear kind, naming it."""
    kind = find_kind(module)
    if config.use_dora and kind is not None and not kind.linear:
        raise ConfigError(
            f"LoraConfig.use_dora = True cannot apply to {name!r} ({type(module).__name__}): DoRA is "
            "supported on linear layers (nn.Linear, Conv1D, bitsandbytes 4/8-bit) only; drop it from "
            "target_modules or list it in exclude_modules")


VARIANT = Variant("use_dora", DoraWeights, tensor_keys={"magnitude": "lora_magnitude_vector"},
                  check_target=check_target, excludes=("lora_bias",))
