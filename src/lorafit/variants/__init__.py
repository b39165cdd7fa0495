"""Variants of the adapter maths: one module per variant, each declaring its `lorafit.registry.Variant`.

To add a variant, add a module here with a `LoraWeights` subclass and a module-level ``Variant``
record (the `LoraConfig` field that selects it, its tensors' names in the PEFT file, the targets
it refuses); nothing else needs to change.
"""
