"""LoRA on `nn.Linear` and Hugging Face's `Conv1D` (GPT-2; weight stored [in, out]).

Besides the stacked path every kind has, the linear kind runs a single plain adapter through
the fused autograd node (`lorafit.functional.fused_lora_linear`) and mixed batches through a
gathered batched matmul (`LoraLinear.forward_gathered`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import WeightSource, frozen_linear, fused_dtype, fused_lora_linear, lora_linear_delta
from ..layers import LoraLayer, LoraWeights
from ..registry import LayerKind
from ..routing import RowAdapters


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2), recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


class LoraLinear(LoraLayer):
    """LoRA on `nn.Linear` or Hugging Face `Conv1D` (``fan_in_fan_out``: weight stored [in, out])."""

    gathers = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        weight = base_layer.weight
        if fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.in_features = getattr(base_layer, "in_features", None) or weight.shape[1]
            self.out_features = getattr(base_layer, "out_features", None) or weight.shape[0]

    def factor_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def weight_view(self) -> Tensor:
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def lora_output(self, x: Tensor, w: LoraWeights) -> Tensor:
        return lora_linear_delta(x.to(w.A.dtype), w.A, w.B, w.scaling)

    def forward_fused(self, x: Tensor, w: LoraWeights) -> Tensor:
        p = w.dropout_p if w.dropping else 0.0
        return fused_lora_linear(x, self.kernel_weight(), self.base_layer.bias, w.A, w.B, w.scaling, p,
                                 self.fan_in_fan_out, fused_dtype(x, w.A))

    def base_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """A base with a `kernel_weight` runs through `frozen_linear`, the kernel call of the fused
        path, so merged, disabled and mixed-batch forwards are as fast as the single-adapter one."""
        weight = self.kernel_weight()
        dtype = weight.dtype if isinstance(weight, Tensor) else torch.float32  # a function makes fp32
        if (weight is None or args or kwargs or x.dtype != dtype
                or torch.is_autocast_enabled(x.device.type)):
            return super().base_forward(x, *args, **kwargs)
        return frozen_linear(x, weight, self.base_layer.bias, self.fan_in_fan_out)

    def kernel_weight(self) -> Optional[WeightSource]:
        """The frozen base weight for lorafit's kernels, laid out as stored ([out, in], or [in, out]
        with `fan_in_fan_out`): a plain `nn.Linear` / `Conv1D` base's weight, or None when the
        base layer has to run itself (a trainable weight, other module types). Quantised kinds
        may return a function that dequantises it."""
        base = self.base_layer
        weight = base.weight
        if weight.requires_grad or not (type(base) is nn.Linear or is_hf_conv1d(base)):
            return None
        return weight

    def forward_gathered(self, x: Tensor, rows: RowAdapters, base: Tensor) -> Tensor:
        """``base_i + s_i · B_i A_i x_i`` for every row i at once: the adapters' factors are
        zero-padded to a common rank and stacked (with a zero slot for base rows), gathered per
        row and applied with two batched matmuls, the second accumulating into the base output in
        place (the Punica / S-LoRA idea). x [b, ..., in], base [b, ..., out]."""
        slots, _ = rows.indices(x.device)
        weights = [self.lora[n] if n in self.lora else None for n in rows.present]
        r_max = max((w.rank for w in weights if w is not None), default=1)
        dtype = next((w.A.dtype for w in weights if w is not None), x.dtype)
        zero_a = x.new_zeros((r_max, self.in_features), dtype=dtype)
        zero_b = x.new_zeros((self.out_features, r_max), dtype=dtype)
        a_stack = torch.stack([zero_a if w is None else _pad_rank(w.A, 0, r_max) for w in weights] + [zero_a])
        b_stack = torch.stack([zero_b if w is None else _pad_rank(w.B * w.scaling, 1, r_max)
                               for w in weights] + [zero_b])
        xb = x.reshape(x.shape[0], -1, self.in_features).to(dtype)  # (b, T, in)
        h = torch.bmm(xb, a_stack[slots].transpose(1, 2))  # (b, T, r_max)
        out = base.reshape(xb.shape[0], xb.shape[1], -1).to(h.dtype)  # (b, T, out); base itself if it can
        out.baddbmm_(h, b_stack[slots].transpose(1, 2).to(h.dtype))
        return out.reshape(base.shape).to(base.dtype)


def _pad_rank(factor: Tensor, dim: int, r_max: int) -> Tensor:
    """`factor` with its rank dimension `dim` zero-padded to `r_max` (itself when it has that rank)."""
    missing = r_max - factor.shape[dim]
    if not missing:
        return factor
    return F.pad(factor, (0, 0, 0, missing) if dim == 0 else (0, missing))


LINEAR = LayerKind("linear", lambda m: isinstance(m, nn.Linear), LoraLinear, linear=True)
HF_CONV1D = LayerKind("hf_conv1d", is_hf_conv1d, lambda m: LoraLinear(m, fan_in_fan_out=True), linear=True)
