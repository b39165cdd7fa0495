"""Initialisation schemes (`init_lora_weights`): one module per scheme, each declaring its
`lorafit.registry.InitScheme`.

To add a scheme, add a module here with its init function and a module-level ``InitScheme``
record; `LoraConfig` validation, layer creation and adapter loading find it through the registry.
Schemes that need data or the whole config (EVA, CorDA, LoRA-GA, LoftQ) run `prepare` first
(`lorafit.inits.prepared`).
"""

from .prepared import prepare

__all__ = ["prepare"]
