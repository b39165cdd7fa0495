"""LoRA layer kinds: one module per kind of base layer, each declaring its `lorafit.registry.LayerKind`.

To support a new kind of base layer, add a module here with a `LoraLayer` subclass and a
module-level ``LayerKind`` record; nothing else needs to change.
"""
