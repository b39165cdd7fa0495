"""LoRA variants, registered with the core's tables on import (`lorafit` imports this package):

* DoRA (`use_dora`): `DoraWeights` in `model.WEIGHT_VARIANTS`;
* PiSSA / OLoRA (`init_lora_weights="pissa" | "pissa_niter_K" | "olora"`): `layers.INIT_HOOKS`;
* quantised bases: `lorafit.quant.QuantLoraLinear` as a linear layer kind (`layers.register_kind`);
* refusals that name the module (`model.TARGET_CHECKS`), checked before any layer is replaced.
"""

from .. import quant
from ..layers import INIT_HOOKS, LayerKind, register_kind
from ..model import TARGET_CHECKS, WEIGHT_VARIANTS
from . import dora, init
from .dora import DoraWeights
from .init import plain_lora_config, plain_lora_factors, snapshot_factors, to_plain_lora

WEIGHT_VARIANTS.append((lambda config: config.use_dora, DoraWeights))
INIT_HOOKS.update(init.INIT_FUNCTIONS)
TARGET_CHECKS.extend([dora.check_target, init.check_target])
register_kind(LayerKind(quant.is_quantized_linear, quant.QuantLoraLinear, linear=True))

__all__ = ["DoraWeights", "snapshot_factors", "to_plain_lora", "plain_lora_config", "plain_lora_factors"]
