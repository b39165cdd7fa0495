"""``ensure_weight_tying`` (PEFT): an output head H that shares the input embedding's weight
E [vocab, dim] (tied embeddings, ``H = E``) gets the embedding's adapter, so the two stay tied.

* LoRA (the embedding or a tied head in target_modules): the embedding gets the LoRA, with
  A_e [r, vocab] and B_e [dim, r], ``ΔE = s · (B_e A_e)ᵀ`` [vocab, dim]. The head's factors are
  the transposes of the embedding's, ``A_h = B_eᵀ`` [r, dim] and ``B_h = A_eᵀ`` [vocab, r], so
  ``ΔH = s · B_h A_h = s · A_eᵀ B_eᵀ = s · (B_e A_e)ᵀ = ΔE``. As in PEFT, A_h and B_h are
  parameters of their own that share the embedding factors' storage (`TiedLoraWeights`): an
  optimizer sees four parameters, gives each the gradient of its own module, keeps separate
  state for each, and applies both updates to the one storage. Merging writes ΔE once into the
  shared weight, which stays shared.
* modules_to_save (the embedding or a tied head): the embedding gets its trainable copy and the
  head's copy uses that copy's weight parameter itself (one parameter, as in PEFT).

As PEFT, the config is rewritten first (`prepare_tying`): the embedding joins target_modules
(or modules_to_save) and list entries naming a tied head leave it; a head that a regular
expression still selects gets the tied adapter in place of its own. The file keeps PEFT's
layout: the head's tensors are saved beside the embedding's (``lm_head.lora_A.weight`` = B_eᵀ,
``lm_head.lora_B.weight`` = A_eᵀ; or ``lm_head.weight`` = the embedding copy's weight), and on
loading they are copied into the shared storage.

Warnings as PEFT's: the flag on a model without tied embeddings, or with no tied module in the
adapter; a tied module in the adapter without the flag. Trainable token rows of tied modules are
tied by `lorafit.kinds.tokens` whether or not the flag is set; with it, different rows for the
embedding and its tied head are refused there.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any, Optional

from torch import nn

from ..errors import ConfigError
from ..layers import LoraLayer, LoraWeights, ModulesToSave
from ..registry import SourceTarget, TargetSource, find_init, find_kind, selected_variant
from ..surgery import has_suffix, module_target_paths, selected, unwrapped, walk


class TiedLoraWeights(LoraWeights):
    """A tied output head's adapter: ``A = B_eᵀ`` [r, dim] and ``B = A_eᵀ`` [vocab, r] of the
    embedding layer `source_layer`'s adapter `source`, as parameters sharing their storage (see
    the module docstring). They are pointed at the source's storage again whenever the module's
    tensors are converted or copied (``.to()``, ``deepcopy``), which would otherwise untie them;
    the source must be converted first, as it is in models whose head comes after the embedding."""

    def __init__(self, source_layer: LoraLayer, source: LoraWeights, scaling: float, dropout_p: float = 0.0):
        super().__init__(source.B.detach().T, source.A.detach().T, scaling, dropout_p)
        self.__dict__["source_layer"] = source_layer  # not submodules: saved and trained by the embedding
        self.__dict__["source"] = source

    def retie(self) -> None:
        """Make A and B views of the source's B and A again."""
        self.A.data = self.source.B.data.T
        self.B.data = self.source.A.data.T

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.retie()
        return self

    def __setstate__(self, state: dict) -> None:  # deepcopy / unpickling clone parameters one by one
        super().__setstate__(state)
        self.retie()

    def merged_with(self, layer: LoraLayer) -> LoraWeights:
        return self.source if layer.base_layer.weight is self.source_layer.base_layer.weight else self

    def merge(self, layer: LoraLayer, safe: bool) -> None:
        if not self.merged_elsewhere(layer):  # the base was untied since: merge into the head's own weight
            super().merge(layer, safe)

    def unmerge(self, layer: LoraLayer) -> None:
        if not self.merged_elsewhere(layer):
            super().unmerge(layer)


def input_embedding_path(root: nn.Module) -> Optional[str]:
    """The module path of the model's input embeddings (``get_input_embeddings``), or None."""
    get = getattr(root, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return next((p for p, m in walk(root) if m is embedding), None) if embedding is not None else None


def tied_heads(root: nn.Module, embedding_path: Optional[str], modules: Optional[dict] = None) -> list[str]:
    """Paths of the modules whose weight is the input embedding's weight (tied embeddings)."""
    if embedding_path is None:
        return []
    modules = dict(walk(root)) if modules is None else modules

    def weight(module: nn.Module) -> Any:
        base = module.original_module if isinstance(module, ModulesToSave) else unwrapped(module)
        return getattr(base, "weight", None)

    shared = weight(modules[embedding_path])
    return [p for p, m in modules.items()
            if p != embedding_path and isinstance(weight(m), nn.Parameter) and weight(m) is shared]


def prepare_tying(config: Any, root: nn.Module) -> Any:
    """PEFT's rewrite for ``ensure_weight_tying``: when modules_to_save (else target_modules)
    selects the input embedding or a tied head, the embedding joins it and list entries naming a
    tied head leave it (a regular expression gets ``|^<embedding>$``). Warns as PEFT does."""
    embedding = input_embedding_path(root)
    heads = tied_heads(root, embedding)
    tied = [embedding, *heads] if heads else []
    saved = config.modules_to_save or []
    in_saved = any(has_suffix(p, saved) for p in tied)
    in_targets = config.target_modules is not None and any(selected(config.target_modules, p) for p in tied)
    if not config.ensure_weight_tying:
        if in_saved or in_targets:
            warnings.warn("the model has tied embeddings and a tied layer is part of the adapter, but "
                          "LoraConfig.ensure_weight_tying is not set: the adapter unties them (merging, exports)")
        return config
    if not heads:
        warnings.warn("LoraConfig.ensure_weight_tying = True, but the model has no tied embeddings")
        return config
    if in_saved:
        return config.replace(modules_to_save=_with_embedding(saved, embedding, heads))
    if in_targets:
        targets = config.target_modules
        if isinstance(targets, str):
            return config if selected(targets, embedding) else \
                config.replace(target_modules=rf"(?:{targets}|^{re.escape(embedding)}$)")
        return config.replace(target_modules=_with_embedding(targets, embedding, heads))
    if not config.trainable_token_indices:
        warnings.warn("LoraConfig.ensure_weight_tying = True, but neither target_modules nor modules_to_save "
                      f"holds a tied module ({', '.join(tied)})")
    return config


def _with_embedding(entries: list[str], embedding: str, heads: list[str]) -> list[str]:
    """`entries` without those naming a tied head, with the embedding's path unless one names it."""
    kept = [e for e in entries if not any(has_suffix(h, [e]) for h in heads)]
    return kept if has_suffix(embedding, kept) else [*kept, embedding]


def find_tied_targets(config: Any, root: nn.Module) -> list[SourceTarget]:
    """The tied heads' adapters for a config `prepare_tying` rewrote: each tied head gets the
    embedding's LoRA (transposed) or shares its modules_to_save copy; none when neither is set."""
    embedding = input_embedding_path(root)
    modules = dict(walk(root))
    heads = tied_heads(root, embedding, modules)
    if not heads:
        return []
    if has_suffix(embedding, config.modules_to_save or []):
        return [_tied_copy(root, path, modules[path], embedding) for path in heads]
    targeted = module_target_paths(root, config)
    if embedding not in targeted:
        return []
    if selected_variant(config) is not None:
        raise ConfigError("LoraConfig.ensure_weight_tying = True ties plain LoRA layers only; the config selects "
                          f"a variant ({selected_variant(config).field})")
    return [_tied_lora(config, root, path, modules[path], embedding, path in targeted) for path in heads]


def _tied_lora(config: Any, root: nn.Module, path: str, module: nn.Module, embedding: str,
               targeted: bool) -> SourceTarget:
    """The tied LoRA of the head at `path`. A head that target_modules still selects (a regular
    expression) already has the LoRA layer and its file tensors; the tied adapter replaces its own."""
    base = unwrapped(module)
    kind = find_kind(base)
    if not isinstance(base, nn.Linear) or kind is None:
        raise ConfigError(f"LoraConfig.ensure_weight_tying = True: the tied head {path!r} is a "
                          f"{type(base).__name__}; tied LoRA layers need an nn.Linear head")
    r = config.rank_for(embedding)
    vocab, dim = base.weight.shape
    shapes = {} if targeted else {"A": (r, dim), "B": (vocab, r)}
    keys = {} if targeted else dict(zip(("A", "B"), kind.factor_keys))
    make = None if targeted or isinstance(module, LoraLayer) else kind.wrap
    add = functools.partial(_add_tied_lora, root=root, source_path=embedding, scaling=config.scaling_for(path),
                            dropout=config.lora_dropout, init=config.init_lora_weights)
    return SourceTarget(path, path, make, add, shapes, keys)


def _add_tied_lora(layer: LoraLayer, name: str, root: nn.Module, source_path: str, scaling: float,
                   dropout: float, init: Any) -> None:
    source_layer = root.get_submodule(source_path)
    layer.add(name, TiedLoraWeights(source_layer, source_layer.lora[name], scaling, dropout))
    weights = layer.lora[name]
    find_init(init).init(layer, weights, init)  # as PEFT: the head's init runs last, on the shared storage


def _tied_copy(root: nn.Module, path: str, module: nn.Module, embedding: str) -> SourceTarget:
    """The head at `path` as a modules_to_save copy whose weight is the embedding copy's."""
    original = module.original_module if isinstance(module, ModulesToSave) else module
    state = original.state_dict()
    make = None if isinstance(module, ModulesToSave) else ModulesToSave
    add = functools.partial(_add_tied_copy, root=root, source_path=embedding)
    return SourceTarget(path, path, make, add, {k: tuple(t.shape) for k, t in state.items()}, {k: k for k in state})


def _add_tied_copy(wrapper: ModulesToSave, name: str, root: nn.Module, source_path: str) -> None:
    source = root.get_submodule(source_path).modules_to_save[name]
    wrapper.add(name, weight=source.weight)


TYING = TargetSource("ensure_weight_tying", find_tied_targets, prepare_tying)
