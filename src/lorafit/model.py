"""`LoraModel`: a model with LoRA adapters injected, and `wrap` / `load`, the ways to get one.

`wrap(model, config)` replaces every targeted submodule with a LoRA layer that holds the original
module as ``base_layer`` (composition). The one other change: a Hugging Face causal LM computes
``model(labels=)``'s loss with `lorafit.functional.causal_lm_loss` (transformers' values, without
fp32 copies of the logits) until `unload`. `LoraModel` forwards attribute access and calls to the
wrapped model, so it drops into an existing training loop, a Hugging Face ``Trainer`` or
``generate()``.

Routing: every layer of a model shares the model's `lorafit.routing.Router`. `disable_adapter`,
`adapter_rows` (mixed batches) and `using_adapter` set the route for a block and restore the
previous one on exit, so they nest, and they are per thread: two threads may run forwards of one
model with different routes at once. Weights, the active set of `set_adapter` and merges are
shared by all threads (`disable_adapter` on a *merged* model unmerges for its block: do not
share a merged model between threads that route differently).
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import adapter_files
from .adapter_files.reading import read_adapter_dir
from .atomic import PathLike
from .combine import CombineReport, combine
from .config import LoraConfig
from .errors import AdapterError, ConfigError, MergeError
from .functional import causal_lm_loss
from .layers import LoraLayer, LoraWeights, ModulesToSave
from .quant import dequantize_model
from .registry import check_targets, find_kind, prepared_config, rewrites_of, selected_variant, target_sources
from .routing import Router, RowAdapters
from .surgery import default_targets, find_modules_to_save, find_targets, replace_module, unwrapped

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


class LoraModel(nn.Module):
    """A base model plus named LoRA adapters, of which one (or several) is active."""

    def __init__(self, model: nn.Module, config: Optional[LoraConfig] = None, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.router = Router()
        self._active: tuple[str, ...] = ()
        model.requires_grad_(False)
        _install_causal_lm_loss(model)
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

    def check_adapter(self, name: Optional[str]) -> None:
        """AdapterError unless `name` is an adapter of this model."""
        if name not in self.peft_config:
            raise AdapterError(f"unknown adapter {name!r}; this model has {self.adapter_names}")

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter named `adapter_name` (not activated: see `set_adapter`).

        Every target is checked (by the variant and init scheme the config selects) before any
        module is replaced, so a refused config leaves the model as it was."""
        self._check_new_name(adapter_name)
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"expected a lorafit.LoraConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)
        if config.target_modules is None:
            config.target_modules = default_targets(self.model)
        config = prepared_config(config, self.model)
        undo = [u for u in (r.rewrite(config, self.model) for r in rewrites_of(config)) if u is not None]
        try:
            targets = find_targets(self.model, config)
            saved = find_modules_to_save(self.model, config.modules_to_save or [])
            variant = selected_variant(config)
            check_targets(config, [(name, unwrapped(module)) for name, module in targets])
            others = [found for source in target_sources(config) for found in source.find(config, self.model)]
        except Exception:
            for step in reversed(undo):
                step()
            raise
        for name, module in targets:
            layer = module if isinstance(module, LoraLayer) else self._wrap_at(name, module)
            layer.create(adapter_name, config.rank_for(name), config.scaling_for(name),
                         config.lora_dropout, config.init_lora_weights, variant=variant)
        for name, module in saved:  # before the target sources: a tied head's copy shares the embedding's
            wrapper = module if isinstance(module, ModulesToSave) else self._wrap_at(name, ModulesToSave(module))
            wrapper.add(adapter_name)
        for target in others:
            at = self.model.get_submodule(target.at)
            layer = self._wrap_at(target.at, target.make(at)) if target.make else self.model.get_submodule(target.path)
            target.add(layer, adapter_name)
        self.peft_config[adapter_name] = config
        self._update_trainable()

    def _wrap_at(self, path: str, module: nn.Module) -> nn.Module:
        wrapper = module if isinstance(module, (ModulesToSave, LoraLayer)) else find_kind(module).wrap(module)
        wrapper.router = self.router
        return replace_module(self.model, path, wrapper)

    def add_adapter_weights(self, adapter_name: str, config: LoraConfig, weights: dict[str, LoraWeights]) -> None:
        """Add adapter `adapter_name` with ready-made factors {module path: LoraWeights}
        (combination, conversion); `config` describes them for saving."""
        self._check_new_name(adapter_name)
        layers = dict(self.lora_layers())
        missing = [path for path in weights if path not in layers]
        if missing:
            raise AdapterError(f"adapter {adapter_name!r}: no LoRA layer at {missing}")
        for path, w in weights.items():
            layers[path].add(adapter_name, w)
        self.peft_config[adapter_name] = copy.deepcopy(config)
        self._update_trainable()

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
            raise AdapterError(
                f"adapter name {adapter_name!r} is invalid: use letters, digits, '_' and '-' only")
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} already exists; delete_adapter() it first")

    def combine(self, weights: dict[str, float], name: str, method: str = "cat", **options) -> CombineReport:
        """Add adapter `name` ≈ Σ w_i · adapter_i (see `lorafit.combine`); returns a CombineReport."""
        return combine(self, weights, name, method=method, **options)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make `adapter_name` (or several, whose updates add up) the active adapter(s)."""
        names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
        for name in names:
            self.check_adapter(name)
        self._active = names
        for _, layer in self.wrappers():
            layer.active = names
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_adapter(adapter_name)
        for _, layer in self.wrappers():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora:
                layer.remove(adapter_name)
            elif isinstance(layer, ModulesToSave) and adapter_name in layer.modules_to_save:
                layer.remove(adapter_name)
        del self.peft_config[adapter_name]
        self._active = tuple(a for a in self._active if a != adapter_name)
        self._update_trainable()

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
                    if name.endswith("bias") and ".lora." not in name and (bias == "all" or lora_bias):
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
            self.check_adapter(name)
            self._refuse_rewritten_base(name, "cannot be merged: its layers share their weights", MergeError)
        self._untie_merge_targets(names)
        if safe:
            for module_name, layer in self.lora_layers():
                for name in names:
                    if name in layer.lora and name not in layer.merged and not _finite(layer.lora[name]):
                        raise MergeError(f"adapter {name!r} has NaN/Inf in its update of {module_name!r}; "
                                         "no weights were changed")
        for _, layer in self.lora_layers():
            layer.merge(names)

    def _refuse_rewritten_base(self, name: str, why: str, error: type) -> None:
        """`error` when adapter `name` rewrote the base's structure (`lorafit.registry.BaseRewrite`)."""
        for rewrite in rewrites_of(self.peft_config[name]):
            raise error(f"adapter {name!r} sets LoraConfig.{rewrite.field} = "
                        f"{getattr(self.peft_config[name], rewrite.field)!r}, which {why}")

    def _untie_merge_targets(self, names: Sequence[str]) -> None:
        """Give a merge target whose weight is shared (e.g. input embeddings tied to the output
        head) its own copy unless every module using that weight receives the same updates from
        merging `names`, so merging changes each module as the unmerged forward does. A tied
        head's adapter brings its embedding adapter's update (`LoraWeights.merged_with`); a
        module without LoRA on the weight brings none."""
        layers = dict(self.lora_layers())

        def updates(path: str, param: nn.Parameter) -> frozenset:  # what merging brings the module using param
            layer = layers.get(path.rpartition(".")[0].removesuffix(".base_layer"))
            if layer is None or getattr(layer.base_layer, "weight", None) is not param:
                return frozenset()
            return frozenset(id(layer.lora[n].merged_with(layer)) for n in names
                             if n in layer.lora and n not in layer.merged)

        uses: dict[int, set[frozenset]] = {}
        for path, param in self.model.named_parameters(remove_duplicate=False):
            uses.setdefault(id(param), set()).add(updates(path, param))
        for module_name, layer in layers.items():
            weight = getattr(layer.base_layer, "weight", None)  # None: a parameter target's module
            if len(uses.get(id(weight), ())) > 1 and any(n in layer.lora and n not in layer.merged for n in names):
                warnings.warn(f"{module_name}.weight is tied to another module that this merge changes "
                              "differently; merging unties it")
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
            dequantize_model(self.model)
        self.merge(adapter_names, safe=safe)
        return self.unload()

    def unload(self) -> nn.Module:
        """Return the base model with lorafit layers removed (merged updates stay in the weights;
        a modules-to-save wrapper leaves the active adapter's copy in place)."""
        for name, layer in reversed(list(self.wrappers())):  # inner first: nested layers (target_parameters)
            plain = layer.base_layer if isinstance(layer, LoraLayer) else layer.current()
            replace_module(self.model, name, plain)
        self.peft_config.clear()
        self._active = ()
        if self.model.__dict__.get("_loss_function") is causal_lm_loss:
            del self.model._loss_function  # back to transformers' own
        return self.model

    # -- routing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the plain base model inside the block (merged adapters are unmerged meanwhile).
        Nests, and is per thread for unmerged models (see the module docstring)."""
        merged = self.merged_adapters
        self.unmerge()
        try:
            with self.router.using(disabled=True):
                yield
        finally:
            if merged:
                self.merge(merged)

    @contextlib.contextmanager
    def adapter_rows(self, adapter_names: Optional[Sequence[Optional[str]]]):
        """Within the block, row i of every batch uses adapter ``adapter_names[i]`` (None = base);
        ``None`` leaves the route as it is."""
        if adapter_names is None:
            yield
            return
        for name in adapter_names:
            if name is not None:
                self.check_adapter(name)
        for name in self.peft_config:
            self._refuse_rewritten_base(name, "changed the base model's layers, so the other rows of a mixed "
                                              "batch would not run on their own base; run it alone", AdapterError)
        with self.router.using(rows=RowAdapters(adapter_names), disabled=False):
            yield

    @contextlib.contextmanager
    def using_adapter(self, adapter_name: Union[str, Sequence[str]]):
        """Within the block, `adapter_name` (one or several) is active for this thread; the
        active set of `set_adapter` (and which adapters train) is unchanged."""
        names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
        for name in names:
            self.check_adapter(name)
        with self.router.using(active=names, disabled=False):
            yield

    # -- running -------------------------------------------------------------------------------

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
        return adapter_files.save_adapter(self, path, adapter_names=adapter_names, **kwargs)

    def load_adapter(self, path, adapter_name: str = "default", **kwargs) -> None:
        """Add the adapter in `path` (see `adapter_files.load_adapter`)."""
        adapter_files.load_adapter(self, path, adapter_name=adapter_name, **kwargs)


def wrap(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Freeze `model`, inject the adapter `adapter_name` described by `config`, and activate it."""
    return LoraModel(model, config, adapter_name)


def load(model: nn.Module, path: PathLike, adapter_name: str = "default", *, trainable: bool = False,
         strict: bool = False, allow_pickle: bool = False) -> LoraModel:
    """Load the adapter in `path` onto `model` and activate it: ``lorafit.load(base, "out/")``.

    `model` is a plain model (wrapped into a new `LoraModel`) or a `LoraModel` (the adapter is
    added). Unless `trainable`, the adapter is frozen and the model is put in eval mode. With
    `strict`, a base-model fingerprint mismatch is an error instead of a warning. If loading
    fails, `model` is left unchanged (the file is checked against it before anything changes).
    """
    if isinstance(model, LoraModel):
        adapter_files.check_new_name(model, adapter_name, replace=False)
    root = model.model if isinstance(model, LoraModel) else model
    checked = adapter_files.plan(root, read_adapter_dir(path, allow_pickle=allow_pickle), trainable=trainable,
                                 strict=strict)
    lora_model = model if isinstance(model, LoraModel) else LoraModel(model)
    adapter_files.apply_new(lora_model, adapter_name, checked)
    lora_model.set_adapter(adapter_name)
    if not trainable:
        lora_model.eval()
    return lora_model


def _install_causal_lm_loss(model: nn.Module) -> None:
    """Give a Hugging Face causal LM whose ``loss_function`` is transformers' ``ForCausalLMLoss``
    lorafit's `causal_lm_loss`: ``model(input_ids, labels=...)`` returns the same loss and
    gradients without fp32 copies of the logits (`unload` puts the original back). Other models,
    and models given their own loss function, are left as they are."""
    state = model.__dict__
    if state.get("loss_type") != "ForCausalLM" or "_loss_function" in state:
        return
    if getattr(model.loss_function, "__name__", None) == "ForCausalLMLoss":
        model.loss_function = causal_lm_loss


def _finite(weights: LoraWeights) -> bool:
    """ΔW and every parameter of the adapter (e.g. DoRA's magnitude) are free of NaN/Inf."""
    return bool(torch.isfinite(weights.delta()).all()) and all(
        bool(torch.isfinite(p).all()) for p in weights.parameters())
