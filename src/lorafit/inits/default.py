"""The default initialisations: ``True`` (Kaiming-uniform A, zero B, Hu et al. 2021 §4.1),
``"gaussian"`` (A ~ N(0, 1/r), zero B) and ``False`` (both random: not the identity at start,
for tests). Each layer kind defines them for its geometry (`LoraLayer.reset_factors`; embeddings
follow PEFT with A zero and B normal)."""

from ..registry import InitScheme


def reset(layer, weights, value) -> None:
    layer.reset_factors(weights, value)


DEFAULT = InitScheme("True|False|gaussian", reset, spelling="True, False, 'gaussian'")
