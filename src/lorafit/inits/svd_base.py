"""What PiSSA and OLoRA share: both write the factors from a decomposition of the layer's weight
W [out, in] (fp32), then replace the base weight by the residual so the output is unchanged at
step 0:

    W_res = W − s · B A          (W_res + s · B A = W)

The adapter then only makes sense with the modified base; `lorafit.inits.conversion` turns it
into a plain LoRA for the original base. Refused (ConfigError naming the module when the adapter
is added): a quantised base (the residual would have to be re-quantised; PEFT dequantises and
re-quantises, lorafit does not), Embedding/Conv layers, and r larger than min(out, in).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import LoraLayer, LoraWeights
from ..quant import is_quantized_linear
from ..registry import find_kind


def write_residual(layer: LoraLayer, w: LoraWeights, A: Tensor, B: Tensor) -> None:
    """Store the factors and ``W ← W − s·B A`` (computed in fp32, rounded once)."""
    weight = layer.weight_view()
    with torch.no_grad():
        w.A.copy_(A)
        w.B.copy_(B)
        weight.copy_((weight.float() - w.scaling * (B @ A)).to(weight.dtype))


def check_decomposable(config, name: str, module: nn.Module) -> None:
    """Refuse a scheme that decomposes W where it cannot work, naming the module."""
    scheme = config.init_lora_weights
    what = f"LoraConfig.init_lora_weights = {scheme!r} cannot apply to {name!r} ({type(module).__name__})"
    if is_quantized_linear(module):
        raise ConfigError(f"{what}: the base is quantised. Initialise on the full-precision model, then "
                          "quantise the residual base, or use init_lora_weights=True")
    kind = find_kind(module)
    if kind is None or not kind.linear:
        raise ConfigError(f"{what}: only linear layers (nn.Linear, Conv1D) are supported")
    r = config.rank_for(name)
    if min(module.weight.shape) < r:
        raise ConfigError(f"{what}: rank {r} exceeds min(out, in) = {min(module.weight.shape)}")
