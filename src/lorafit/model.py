"""`LoraModel`: a model with LoRA adapters injected, and the surgery that puts them there.

`wrap(model, config)` replaces every targeted submodule with a LoRA layer that holds the original
module as ``base_layer`` (composition); nothing else in the model changes. `LoraModel` forwards
attribute access and calls to the wrapped model, so it drops into an existing training loop, a
Hugging Face ``Trainer`` or ``generate()``.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterError, ConfigError, MergeError, TargetError
from .layers import LoraLayer, LoraWeights, ModulesToSave, RowAdapters, find_kind

# target_modules used when a config names none, by Hugging Face `model_type` (PEFT's defaults).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
}
_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")

# (predicate on the config, LoraWeights subclass): variants such as DoRA register here.
WEIGHT_VARIANTS: list[tuple] = []

# check(config, module path, base module) run on every target before any layer is replaced;
# raises ConfigError naming the module (variants register their refusals here).
TARGET_CHECKS: list = []


def weights_class(config: LoraConfig) -> type[LoraWeights]:
    for applies, cls in WEIGHT_VARIANTS:
        if applies(config):
            return cls
    if config.use_dora:
        raise ConfigError("LoraConfig.use_dora = True needs the DoRA variant, which is not available")
    return LoraWeights


class LoraModel(nn.Module):
    """A base model plus named LoRA adapters, of which one (or several) is active."""

    def __init__(self, model: nn.Module, config: Optional[LoraConfig] = None, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: tuple[str, ...] = ()
        model.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # -- attribute forwarding ---------------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__["_modules"].get("model")
            if model is None or name == "model":
                raise
            return getattr(model, name)

    # -- adapters --------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_config)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active[0] if self._active else None

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter named `adapter_name` (not activated: see `set_adapter`)."""
        if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
            raise AdapterError(
                f"adapter name {adapter_name!r} is invalid: use letters, digits, '_' and '-' only")
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} already exists; delete_adapter() it first")
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"expected a lorafit.LoraConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)
        if config.target_modules is None:
            config.target_modules = _default_targets(self.model)
        targets = find_targets(self.model, config)
        saved = _find_modules_to_save(self.model, config.modules_to_save or [])
        variant = weights_class(config)
        for name, module in targets:
            for check in TARGET_CHECKS:
                check(config, name, module.base_layer if isinstance(module, LoraLayer) else module)
        for name, module in targets:
            layer = module if isinstance(module, LoraLayer) else _replace(self.model, name, find_kind(module).wrap(module))
            layer.create(adapter_name, config.rank_for(name), config.scaling_for(name),
                         config.lora_dropout, config.init_lora_weights, weights_cls=variant)
        for name, module in saved:
            wrapper = module if isinstance(module, ModulesToSave) else _replace(self.model, name, ModulesToSave(module))
            wrapper.add(adapter_name)
        self.peft_config[adapter_name] = config
        self._update_trainable()

    def add_adapter_weights(self, adapter_name: str, config: LoraConfig, weights: dict[str, LoraWeights]) -> None:
        """Add adapter `adapter_name` with ready-made factors {module path: LoraWeights}
        (combination, conversion); `config` describes them for saving."""
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} already exists; delete_adapter() it first")
        layers = dict(self.lora_layers())
        missing = [path for path in weights if path not in layers]
        if missing:
            raise AdapterError(f"adapter {adapter_name!r}: no LoRA layer at {missing}")
        for path, w in weights.items():
            layers[path].add(adapter_name, w)
        self.peft_config[adapter_name] = copy.deepcopy(config)
        self._update_trainable()

    def combine(self, weights: dict[str, float], name: str, method: str = "cat", rank: Optional[int] = None):
        """Add adapter `name` ≈ Σ w_i · adapter_i (see `lorafit.combine`); returns a CombineReport."""
        from .combine import combine

        return combine(self, weights, name, method=method, rank=rank)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make `adapter_name` (or several, whose updates add up) the active adapter(s)."""
        names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
        for name in names:
            self._check_known(name)
        self._active = names
        for _, layer in self.wrappers():
            layer.active = names
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        for _, layer in self.wrappers():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora:
                layer.remove(adapter_name)
            elif isinstance(layer, ModulesToSave) and adapter_name in layer.modules_to_save:
                layer.remove(adapter_name)
        del self.peft_config[adapter_name]
        self._active = tuple(a for a in self._active if a != adapter_name)
        self._update_trainable()

    def _check_known(self, name: Optional[str]) -> None:
        if name not in self.peft_config:
            raise AdapterError(f"unknown adapter {name!r}; this model has {self.adapter_names}")

    def wrappers(self) -> Iterator[tuple[str, Union[LoraLayer, ModulesToSave]]]:
        """Every LoRA layer and modules-to-save wrapper, with its module path in the base model."""
        for name, module in self.model.named_modules():
            if isinstance(module, (LoraLayer, ModulesToSave)):
                yield name, module

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.wrappers():
            if isinstance(module, LoraLayer):
                yield name, module

    def _update_trainable(self) -> None:
        """Only the active adapters' factors (and copies, and biases per `bias`) train."""
        self.model.requires_grad_(False)
        for name, layer in self.wrappers():
            if isinstance(layer, LoraLayer):
                for adapter, weights in layer.lora.items():
                    weights.requires_grad_(self._trains(adapter))
            else:
                for adapter, module in layer.modules_to_save.items():
                    module.requires_grad_(self._trains(adapter))
        for adapter in self._active:
            bias = self.peft_config[adapter].bias
            if self._trains(adapter) and bias != "none":
                for name, param in self.model.named_parameters():
                    lora_bias = name.endswith("base_layer.bias")
                    if name.endswith("bias") and (bias == "all" or lora_bias):
                        param.requires_grad_(True)

    def _trains(self, adapter: str) -> bool:
        return adapter in self._active and not self.peft_config[adapter].inference_mode

    # -- parameter counts ----------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")

    # -- merging -------------------------------------------------------------------------------

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """``W ← W + Σ ΔW`` for the given (default: active) adapters, in place.

        With `safe`, every ΔW is checked for NaN/Inf first; if any is bad, no weight changes.
        """
        names = list(self._active if adapter_names is None else adapter_names)
        for name in names:
            self._check_known(name)
        layers = [layer for _, layer in self.lora_layers()]
        self._untie_merge_targets(names)
        if safe:
            for module_name, layer in self.lora_layers():
                for name in names:
                    if name in layer.lora and name not in layer.merged and not _finite(layer.lora[name]):
                        raise MergeError(f"adapter {name!r} has NaN/Inf in its update of {module_name!r}; "
                                         "no weights were changed")
        for layer in layers:
            layer.merge(names)

    def _untie_merge_targets(self, names: Sequence[str]) -> None:
        """Give a merge target whose weight is shared (e.g. input embeddings tied to the output
        head) its own copy, so merging changes only the targeted module, as the unmerged
        forward does."""
        uses: dict[int, int] = {}
        for _, param in self.model.named_parameters(remove_duplicate=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
        for module_name, layer in self.lora_layers():
            weight = layer.base_layer.weight
            if uses.get(id(weight), 0) > 1 and any(n in layer.lora and n not in layer.merged for n in names):
                warnings.warn(f"{module_name}.weight is tied to another module; merging unties it")
                layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)

    def unmerge(self) -> None:
        """Undo every merge: ``W ← W − ΔW`` in reverse order."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    @property
    def merged_adapters(self) -> list[str]:
        return list(dict.fromkeys(n for _, layer in self.lora_layers() for n in layer.merged))

    def merge_and_unload(self, adapter_names: Optional[Sequence[str]] = None, safe: bool = False,
                         dequantize: bool = False) -> nn.Module:
        """Merge, then return the base model with every lorafit layer replaced by a plain module.

        With `dequantize`, quantised (bitsandbytes) layers first become full-precision nn.Linear
        layers holding their dequantised weights, so the merge is exact (`lorafit.quant`)."""
        if dequantize:
            from .quant import dequantize_model

            dequantize_model(self.model)
        self.merge(adapter_names, safe=safe)
        return self.unload()

    def unload(self) -> nn.Module:
        """Return the base model with lorafit layers removed (merged updates stay in the weights;
        a modules-to-save wrapper leaves the active adapter's copy in place)."""
        for name, layer in list(self.wrappers()):
            plain = layer.base_layer if isinstance(layer, LoraLayer) else layer.current()
            _replace(self.model, name, plain)
        self.peft_config.clear()
        self._active = ()
        return self.model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the plain base model inside the block (merged adapters are unmerged meanwhile)."""
        merged = self.merged_adapters
        self.unmerge()
        try:
            with self._on_every_wrapper("disabled", True, False):
                yield
        finally:
            if merged:
                self.merge(merged)

    # -- running -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def adapter_rows(self, adapter_names: Optional[Sequence[Optional[str]]]):
        """Within the block, row i of every batch uses adapter ``adapter_names[i]`` (None = base)."""
        if adapter_names is None:
            yield
            return
        for name in adapter_names:
            if name is not None:
                self._check_known(name)
        with self._on_every_wrapper("rows", RowAdapters(adapter_names), None):
            yield

    @contextlib.contextmanager
    def _on_every_wrapper(self, attribute: str, value, reset):
        """Set `attribute` on every LoRA layer and modules-to-save wrapper for the block."""
        wrappers = [layer for _, layer in self.wrappers()]
        for layer in wrappers:
            setattr(layer, attribute, value)
        try:
            yield
        finally:
            for layer in wrappers:
                setattr(layer, attribute, reset)

    def forward(self, *args, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, past_key_values=None,
                adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """Call the wrapped model; row i of the batch uses ``adapter_names[i]`` when given.

        The usual Hugging Face inputs are named so that tools that read the signature (the
        ``Trainer`` keeps only dataset columns the model's forward names) see them."""
        named = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                     past_key_values=past_key_values)
        kwargs.update({k: v for k, v in named.items() if v is not None})
        with self.adapter_rows(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        with self.adapter_rows(adapter_names):
            return self.model.generate(*args, **kwargs)

    # -- adapter files ---------------------------------------------------------------------------

    def save_adapter(self, path, adapter_names: Optional[Sequence[str]] = None, **kwargs) -> list:
        """Save adapters in PEFT's format; returns the directories written (`adapter_files.save_adapter`)."""
        from .adapter_files import save_adapter

        return save_adapter(self, path, adapter_names=adapter_names, **kwargs)

    def load_adapter(self, path, adapter_name: str = "default", **kwargs) -> None:
        from .adapter_files import load_adapter

        load_adapter(self, path, adapter_name=adapter_name, **kwargs)


def wrap(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Freeze `model`, inject the adapter `adapter_name` described by `config`, and activate it."""
    return LoraModel(model, config, adapter_name)


def _finite(weights: LoraWeights) -> bool:
    """ΔW and every parameter of the adapter (e.g. DoRA's magnitude) are free of NaN/Inf."""
    return bool(torch.isfinite(weights.delta()).all()) and all(
        bool(torch.isfinite(p).all()) for p in weights.parameters())


# -- targeting --------------------------------------------------------------------------------


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named submodules, not descending into lorafit wrappers (they count as their base)."""
    for child_name, child in module.named_children():
        path = f"{prefix}.{child_name}" if prefix else child_name
        yield path, child
        if not isinstance(child, (LoraLayer, ModulesToSave)):
            yield from _walk(child, path)


def _kind_of(module: nn.Module):
    return find_kind(module.base_layer if isinstance(module, LoraLayer) else module)


def _selected(selector, name: str) -> bool:
    """PEFT's matching: a string is a full regex match; a list entry is the exact name or a
    dotted suffix of it."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == key or name.endswith("." + key) for key in selector)


def _layer_index(name: str, patterns: Optional[Sequence[str]]) -> Optional[int]:
    for pattern in patterns or _LAYER_PATTERNS:
        match = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head} | (
        set() if head is not None else {"lm_head"})


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config` selects. Raises `TargetError` when nothing matches,
    listing the model's candidate module names."""
    heads = _output_head_names(model) if config.target_modules == ALL_LINEAR else set()
    saved = config.modules_to_save or []
    targets = []
    for name, module in _walk(model):
        kind = _kind_of(module)
        if kind is None or isinstance(module, ModulesToSave):
            continue
        if config.target_modules == ALL_LINEAR:
            if not kind.linear or name in heads:
                continue
        elif not _selected(config.target_modules, name):
            continue
        if config.exclude_modules and _selected(config.exclude_modules, name):
            continue
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved):
            continue
        if config.layers_to_transform is not None and \
                _layer_index(name, config.layers_pattern) not in config.layers_to_transform:
            continue
        targets.append((name, module))
    if not targets:
        raise TargetError(
            f"target_modules={config.target_modules!r} matches no supported module of "
            f"{type(model).__name__}; candidates: {', '.join(candidate_names(model)) or '(none)'}")
    return targets


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name components of every module LoRA can wrap."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in _walk(model)
                              if _kind_of(module) is not None))


def _find_modules_to_save(model: nn.Module, keys: Sequence[str]) -> list[tuple[str, nn.Module]]:
    found = [(name, module) for name, module in _walk(model) if _selected(list(keys), name)] if keys else []
    missing = [k for k in keys if not any(n == k or n.endswith("." + k) for n, _ in found)]
    if missing:
        raise TargetError(f"modules_to_save entries {missing} match no module of {type(model).__name__}")
    return found


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise ConfigError(
        f"LoraConfig.target_modules is not set and there is no default for model type {model_type!r}; "
        f"choose from: {', '.join(candidate_names(model))}, or use 'all-linear'")


def _replace(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)
    return new
