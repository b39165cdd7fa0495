"""PEFT's tensor names for lorafit's parameters.

A LoRA factor of the module at path ``P`` (relative to the base model) is stored as
``base_model.model.P.<suffix>``; the suffix depends on the layer kind for A and B, and on the
`LoraWeights` variant for any further tensor:

==========================  ======================  ======================
lorafit                     PEFT suffix             shape
==========================  ======================  ======================
A (Linear, Conv1D, Conv)    ``lora_A.weight``       [r, in(, *kernel)]
B (Linear, Conv1D, Conv)    ``lora_B.weight``       [out, r(, 1, ...)]
A (Embedding)               ``lora_embedding_A``    [r, num_embeddings]
B (Embedding)               ``lora_embedding_B``    [dim, r]
DoRA magnitude              ``lora_magnitude_vector``  [out]
==========================  ======================  ======================

A variant adds its tensors in one place, `EXTRA_TENSOR_KEYS` (or `register_tensor_keys` from
outside). Saving refuses a parameter that has no name here rather than silently dropping it.
"""

from __future__ import annotations

from typing import Mapping, Optional

from ..layers import LoraEmbedding, LoraLayer, LoraWeights
from ..variants.dora import DoraWeights

PREFIX = "base_model.model."
DORA_MAGNITUDE = "lora_magnitude_vector"

# Layer class -> {LoraWeights parameter: suffix}; looked up along the class's MRO.
FACTOR_KEYS: dict[type, dict[str, str]] = {
    LoraEmbedding: {"A": "lora_embedding_A", "B": "lora_embedding_B"},
    LoraLayer: {"A": "lora_A.weight", "B": "lora_B.weight"},
}
# LoraWeights variant -> {extra parameter: suffix}; looked up along the class's MRO.
EXTRA_TENSOR_KEYS: dict[type, dict[str, str]] = {
    DoraWeights: {"magnitude": DORA_MAGNITUDE},
}


def register_tensor_keys(weights_cls: type[LoraWeights], keys: Mapping[str, str]) -> None:
    """Name the extra parameters of a `LoraWeights` variant in PEFT's format."""
    EXTRA_TENSOR_KEYS[weights_cls] = dict(keys)


def tensor_keys(layer_cls: type, weights_cls: type) -> dict[str, str]:
    """{parameter name of `weights_cls`: PEFT suffix} for an adapter on a `layer_cls` layer."""
    return {**_lookup(FACTOR_KEYS, layer_cls), **_lookup(EXTRA_TENSOR_KEYS, weights_cls)}


def lora_suffixes() -> list[str]:
    """Every suffix that marks a LoRA tensor (longest first, so matching is unambiguous)."""
    known = {DORA_MAGNITUDE, *(s for t in (*FACTOR_KEYS.values(), *EXTRA_TENSOR_KEYS.values()) for s in t.values())}
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


def _lookup(table: Mapping[type, dict[str, str]], cls: type) -> dict[str, str]:
    return next((table[klass] for klass in cls.__mro__ if klass in table), {})
