"""PEFT's tensor names for lorafit's parameters.

A LoRA factor of the module at path ``P`` (relative to the base model) is stored as
``base_model.model.P.<suffix>``. The suffixes of A and B come from the layer kind's record
(`LayerKind.factor_keys`: ``lora_A.weight`` / ``lora_B.weight``, or ``lora_embedding_A`` /
``lora_embedding_B`` for embeddings); those of a variant's further tensors from the variant's
record (`Variant.tensor_keys`: DoRA's ``lora_magnitude_vector``, lora_bias's ``lora_B.bias``).
Saving refuses a parameter that has no name rather than silently dropping it.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..layers import LoraLayer
from ..registry import extensions, find_kind

PREFIX = "base_model.model."


def tensor_keys(module: nn.Module, weights_cls: type) -> dict[str, str]:
    """{parameter name of `weights_cls`: PEFT suffix} for an adapter on `module`, a base module or
    its LoRA layer. A weights class that names its tensors itself (`file_keys`: targets of
    target_parameters or trainable_token_indices, on modules no layer kind wraps) is used as is."""
    own = getattr(weights_cls, "file_keys", None)
    if own is not None:
        return dict(own)
    base = module.base_layer if isinstance(module, LoraLayer) else module
    a_key, b_key = find_kind(base).factor_keys
    extra = next((dict(v.tensor_keys) for v in extensions().variants if v.weights is weights_cls), {})
    return {"A": a_key, "B": b_key, **extra}


def lora_suffixes() -> list[str]:
    """Every suffix that marks a LoRA tensor (longest first, so matching is unambiguous)."""
    ext = extensions()
    known = {s for kind in ext.kinds for s in kind.factor_keys}
    known |= {s for variant in ext.variants for s in variant.tensor_keys.values()}
    return sorted(known, key=len, reverse=True)


def split_lora_key(key: str) -> Optional[tuple[str, str]]:
    """``(module path, suffix)`` for a LoRA tensor key, None for any other key."""
    path = strip_prefix(key)
    for suffix in lora_suffixes():
        if path.endswith("." + suffix):
            return path[: -len(suffix) - 1], suffix
    return None


def strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key
