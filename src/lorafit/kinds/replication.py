"""Layer replication (PEFT's ``layer_replication``): a deeper model built from the base's layers.

``layer_replication: [[0, 4], [2, 5]]`` turns the decoder layers [0, 1, 2, 3, 4] into
[0, 1, 2, 3, 2, 3, 4]: each range [start, end) is appended in order. A repeated layer is a
copy whose parameters are the original's (no memory for weights), but whose modules are its
own, so every copy gets its own LoRA adapter (Kim et al.'s depth up-scaling, trained cheaply).
The attention modules' ``layer_idx`` is renumbered (the KV cache has one slot per layer) and
``config.num_hidden_layers`` set to the new depth, as PEFT does.

The base's structure changes, so an adapter with layer replication only runs on a model that
was rewritten for it: lorafit refuses it in mixed batches and in merges (the layers share
weights), and ``lorafit serve`` refuses it by name.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

from torch import nn

from ..errors import ConfigError
from ..registry import BaseRewrite

MAP_ATTR = "lorafit_layer_map"  # set on a rebuilt layer list: the map it was built from


def layer_list(root: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, list) of the model's decoder layers: ``(.model)*.layers``, BERT's
    ``encoder.layer`` or Falcon's ``h`` (the places PEFT looks)."""
    model = root
    while isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    model = getattr(model, "bert", model)
    for owner, attribute in ((model, "layers"), (getattr(model, "encoder", None), "layer"), (model, "h")):
        layers = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return owner, attribute, layers
    raise ConfigError(f"LoraConfig.layer_replication: {type(root).__name__} has no layer list (looked for "
                      "model.layers, encoder.layer and h)")


def replicate(config, root: nn.Module) -> Optional[Callable[[], None]]:
    """Rebuild the layer list by `config.layer_replication`; returns the undo, or None when the
    model already has this map. ConfigError (nothing changed) for a bad map or another map."""
    layer_map = [list(pair) for pair in config.layer_replication]
    owner, attribute, layers = layer_list(root)
    done = getattr(layers, MAP_ATTR, None)
    if done is not None:
        if done == layer_map:
            return None
        raise ConfigError(f"LoraConfig.layer_replication = {layer_map}, but the model's layers were already "
                          f"replicated by {done}; adapters of one model must share the map")
    count = len(layers)
    for pair in layer_map:
        if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair) \
                or not 0 <= pair[0] < pair[1] <= count:
            raise ConfigError(f"LoraConfig.layer_replication entry {pair!r} is invalid: expected [start, end) "
                              f"with 0 <= start < end <= {count} (the model's layer count)")
    new = []
    for start, end in layer_map:
        for i in range(start, end):
            new.append(shared_copy(layers[i], index=len(new)))
    replicated = nn.ModuleList(new)
    setattr(replicated, MAP_ATTR, layer_map)
    setattr(owner, attribute, replicated)
    config_obj = getattr(root, "config", None)
    depth = getattr(config_obj, "num_hidden_layers", None)
    if depth is not None:
        config_obj.num_hidden_layers = len(new)

    def undo() -> None:
        setattr(owner, attribute, layers)
        if depth is not None:
            config_obj.num_hidden_layers = depth

    return undo


def shared_copy(layer: nn.Module, index: int) -> nn.Module:
    """A copy of `layer` whose parameters are the original's, its ``layer_idx`` set to `index`."""
    clone = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = clone.get_submodule(name)
        for param_name, param in module.named_parameters(recurse=False):
            target.register_parameter(param_name, param)
    for module in clone.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    return clone


LAYER_REPLICATION = BaseRewrite("layer_replication", replicate)
