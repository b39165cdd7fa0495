"""Finding and replacing modules: which modules a config targets, and swapping them in place.

Selection follows PEFT: a string selector is a full regular-expression match on the module path;
a list entry matches the path exactly or as a dotted suffix (``"q_proj"`` selects
``model.layers.0.self_attn.q_proj``). A LoRA layer or modules-to-save wrapper counts as the
module it wraps, and its insides are never selected.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterator, Optional, Sequence, Union

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import ConfigError, TargetError
from .layers import LoraLayer, ModulesToSave
from .registry import LayerKind, find_kind

# target_modules used when a config names none, by Hugging Face `model_type` (PEFT's defaults).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
}
_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def has_suffix(name: str, keys: Sequence[str]) -> bool:
    """`name` is one of `keys` or ends with ``"." + key`` for one of them."""
    return any(name == key or name.endswith("." + key) for key in keys)


def selected(selector: Union[str, Sequence[str]], name: str) -> bool:
    """PEFT's matching: a string is a full regex match; a list entry is the name or a dotted suffix."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return has_suffix(name, selector)


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named submodules, not descending into lorafit wrappers (they count as their base)."""
    for child_name, child in module.named_children():
        path = f"{prefix}.{child_name}" if prefix else child_name
        yield path, child
        if not isinstance(child, (LoraLayer, ModulesToSave)):
            yield from walk(child, path)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` (a dotted module path under `root`); returns `new`."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)
    return new


def unwrapped(module: nn.Module) -> nn.Module:
    """The base module of a LoRA layer, else the module itself."""
    return module.base_layer if isinstance(module, LoraLayer) else module


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    return find_kind(unwrapped(module))


def layer_index(name: str, patterns: Optional[Sequence[str]]) -> Optional[int]:
    """The index in ``...<pattern>.<i>....`` of a module path (``model.layers.3.mlp`` -> 3)."""
    for pattern in patterns or _LAYER_PATTERNS:
        match = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return {"lm_head"}
    return {name for name, module in model.named_modules() if module is head}


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config` selects. Raises `TargetError` when nothing matches,
    listing the model's candidate module names. ``[]`` (with target_parameters) selects none."""
    if config.target_modules == []:
        return []
    heads = output_head_names(model) if config.target_modules == ALL_LINEAR else set()
    saved = config.modules_to_save or []
    targets = []
    for name, module in walk(model):
        kind = kind_of(module)
        if kind is None or isinstance(module, ModulesToSave):
            continue
        if config.target_modules == ALL_LINEAR:
            if not kind.linear or name in heads:
                continue
        elif not selected(config.target_modules, name):
            continue
        if config.exclude_modules and selected(config.exclude_modules, name):
            continue
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved):
            continue
        if config.layers_to_transform is not None and \
                layer_index(name, config.layers_pattern) not in config.layers_to_transform:
            continue
        targets.append((name, module))
    if not targets:
        raise TargetError(
            f"target_modules={config.target_modules!r} matches no supported module of "
            f"{type(model).__name__}; candidates: {', '.join(candidate_names(model)) or '(none)'}")
    _warn_layout(config, targets)
    return targets


def module_target_paths(model: nn.Module, config: LoraConfig) -> set[str]:
    """Paths `config.target_modules` selects (none while it is unset), for the target sources
    (`lorafit.registry.TargetSource`) to refuse a module targeted twice."""
    return set() if config.target_modules is None else {name for name, _ in find_targets(model, config)}


def _warn_layout(config: LoraConfig, targets: list[tuple[str, nn.Module]]) -> None:
    """`fan_in_fan_out` is decided by the layer kind (HF Conv1D stores [in, out]); a config that
    says otherwise is corrected with a warning naming a module, as PEFT does."""
    for name, module in targets:
        stored_in_out = getattr(module, "fan_in_fan_out", None)
        if stored_in_out is None:
            stored_in_out = kind_of(module).name == "hf_conv1d"
        if stored_in_out != config.fan_in_fan_out and kind_of(module).linear:
            warnings.warn(f"LoraConfig.fan_in_fan_out = {config.fan_in_fan_out} but {name!r} "
                          f"({type(unwrapped(module)).__name__}) stores its weight as "
                          f"{'[in, out]' if stored_in_out else '[out, in]'}; using fan_in_fan_out = {stored_in_out}")
            return


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name components of every module LoRA can wrap."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in walk(model)
                              if kind_of(module) is not None))


def find_modules_to_save(model: nn.Module, keys: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The modules `keys` (modules_to_save entries) name; TargetError naming unmatched entries."""
    found = [(name, module) for name, module in walk(model) if has_suffix(name, keys)] if keys else []
    missing = [k for k in keys if not any(has_suffix(n, [k]) for n, _ in found)]
    if missing:
        raise TargetError(f"modules_to_save entries {missing} match no module of {type(model).__name__}")
    return found


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's default target_modules for the model's `model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise ConfigError(
        f"LoraConfig.target_modules is not set and there is no default for model type {model_type!r}; "
        f"choose from: {', '.join(candidate_names(model))}, or use 'all-linear'")
