"""LoRA on `nn.Conv1d` / `nn.Conv2d`: A is a conv with the base's kernel, stride, padding and
dilation mapping in -> r channels, B a 1×1 conv r -> out."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import LoraLayer, LoraWeights
from ..registry import LayerKind


class LoraConv(LoraLayer):
    """``y = conv(x, W) + b + s · conv(conv(x, A), B)``; grouped and non-zero-padded convolutions
    are refused."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ConfigError(f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported")
        if base_layer.padding_mode != "zeros":
            raise ConfigError(f"LoRA on a convolution with padding_mode={base_layer.padding_mode!r} is not supported")
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._conv: Callable = F.conv1d if isinstance(base_layer, nn.Conv1d) else F.conv2d

    def factor_shapes(self, r):
        kernel = tuple(self.base_layer.kernel_size)
        return (r, self.in_features, *kernel), (self.out_features, r, *([1] * len(kernel)))

    def per_output(self, vector: Tensor, like: Tensor) -> Tensor:
        return vector.reshape(-1, *([1] * (like.dim() - 2)))  # channels on dim 1

    def lora_output(self, x: Tensor, w: LoraWeights) -> Tensor:
        base = self.base_layer
        h = self._conv(x.to(w.A.dtype), w.A, None, base.stride, base.padding, base.dilation)
        return self._conv(h, w.B) * w.scaling


CONV = LayerKind("conv", lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d)), LoraConv)
