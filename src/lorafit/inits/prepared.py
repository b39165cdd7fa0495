"""Initialisations computed before `wrap`, from data or from the whole config: EVA, CorDA,
LoRA-GA, LoftQ.

A scheme's ``init(layer, weights, value)`` sees one layer and its new factors, never the config
or any data. Schemes that need more declare `InitScheme.prepare` and are used in two steps:

    config = lorafit.inits.prepare(model, config, batches)   # forward/backward passes, SVDs
    model = lorafit.wrap(model, config)                      # copies the prepared factors in

`prepare` runs the scheme's step with the config, the targets and the data in hand; the step
computes every target's factors A [r, in], B [out, r] (and, for schemes that rewrite the base,
the new base weight [out, in]) and keeps them beside the base module (`Prepared`, held weakly:
nothing is attached to the module). `wrap` then creates each adapter through `take`, the
schemes' shared init, which copies them in. `prepare` returns the config to wrap with: the same
one, or one whose ranks changed (EVA). The explicit step keeps the data out of the config and of
`wrap`, runs the passes on the plain base (so the adapter being built plays no part in them),
and lets one data set prepare several configs.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..layers import LoraLayer, LoraWeights, base_model_of
from ..registry import TargetCheck, check_targets, find_init, find_kind
from ..surgery import default_targets, find_targets, unwrapped

Run = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class Prepared:
    """What `take` copies into one new adapter: A [r, in], B [out, r] for the scale `scaling`,
    and the new base weight [out, in] (None: the base is left as it is)."""

    path: str
    A: Tensor
    B: Tensor
    scaling: float
    weight: Optional[Tensor] = None


@dataclass(frozen=True)
class Preparation:
    """The input of a scheme's prepare step. `targets` are (module path, base module) in module
    order; `settings` is the scheme's parsed options (`InitScheme.parse_settings`)."""

    model: nn.Module
    config: LoraConfig
    targets: list[tuple[str, nn.Module]]
    settings: Any
    batches: Optional[Iterable[Any]]
    run: Run
    adapters_off: Callable[[], contextlib.AbstractContextManager]

    def each_batch(self, what: str) -> Iterator[Any]:
        """The batches on the model's device; ConfigError when none were given or all were empty."""
        if self.batches is None:
            raise ConfigError(f"LoraConfig.init_lora_weights = {self.config.init_lora_weights!r} needs data "
                              f"({what}): pass batches to lorafit.inits.prepare")
        device = next(self.model.parameters()).device
        count = 0
        for batch in self.batches:
            count += 1
            yield to_device(batch, device)
        if count == 0:
            raise ConfigError(f"lorafit.inits.prepare: no batches for {self.config.init_lora_weights!r} ({what})")


_PENDING: "weakref.WeakKeyDictionary[nn.Module, Prepared]" = weakref.WeakKeyDictionary()
_PREPARING: contextvars.ContextVar[bool] = contextvars.ContextVar("lorafit_preparing", default=False)


def prepare(model: nn.Module, config: LoraConfig, batches: Optional[Iterable[Any]] = None,
            run: Optional[Run] = None) -> LoraConfig:
    """Run the preparation of ``config.init_lora_weights`` on `model` (a plain model or a
    `LoraModel`, whose adapters are switched off meanwhile) and return the config to `wrap` (or
    ``add_adapter``) with. Schemes without a preparation return `config` unchanged.

    `batches` is an iterable of model inputs (dicts of tensors are moved to the model's device);
    ``run(model, batch)`` calls the model (default: ``model(**batch)`` for a dict, else
    ``model(batch)``); LoRA-GA takes the loss from its result (``.loss``, or a scalar tensor).
    Targets are checked as `wrap` checks them before anything runs.
    """
    scheme = find_init(config.init_lora_weights)
    if scheme.prepare is None:
        return config
    root = base_model_of(model)
    if config.target_modules is None:
        config = config.replace(target_modules=default_targets(root))
    targets = [(path, unwrapped(module)) for path, module in find_targets(root, config)]
    token = _PREPARING.set(True)
    try:
        check_targets(config, targets)
    finally:
        _PREPARING.reset(token)
    router = getattr(model, "router", None) if root is not model else None
    preparation = Preparation(
        model=model, config=config, targets=targets, settings=scheme.parse_settings(config), batches=batches,
        run=run or call_model,
        adapters_off=(lambda: router.using(disabled=True)) if router is not None else contextlib.nullcontext)
    return scheme.prepare(preparation)


def keep(prepared: Prepared, base: nn.Module) -> None:
    """Hold `prepared` for the next adapter created on `base` (a later `prepare` replaces it)."""
    _PENDING[base] = prepared


def after_prepare(check: Optional[TargetCheck]) -> TargetCheck:
    """The target check of a prepared scheme: `check` (the scheme's own), then, unless `prepare`
    itself is checking, that this module's factors were prepared for the rank and scale the
    config gives it. `wrap` runs it on every target before replacing any module, so a config
    that was not prepared (or not the one `prepare` returned) leaves the model as it was."""

    def checked(config, name: str, module: nn.Module) -> None:
        if check is not None:
            check(config, name, module)
        if _PREPARING.get():
            return
        prepared = _PENDING.get(module)
        if prepared is None:
            raise ConfigError(f"LoraConfig.init_lora_weights = {config.init_lora_weights!r} computes the factors "
                              f"before wrap, and none were computed for {name!r}: call config = "
                              f"lorafit.inits.prepare(model, config, batches) on this model first")
        r, s = config.rank_for(name), config.scaling_for(name)
        if prepared.A.shape[0] != r or abs(prepared.scaling - s) > 1e-12 * abs(s):
            raise ConfigError(f"{name!r} was prepared for rank {prepared.A.shape[0]} and scale "
                              f"{prepared.scaling:g}, but the config gives rank {r} and scale {s:g}: wrap with "
                              f"the config lorafit.inits.prepare returned")

    return checked


def take(layer: LoraLayer, w: LoraWeights, value: Any) -> None:
    """The init of every prepared scheme: copy the factors `prepare` computed for this base
    module (and its new base weight); `after_prepare` checked they exist and fit."""
    prepared = _PENDING.pop(layer.base_layer)
    with torch.no_grad():
        w.A.copy_(prepared.A)
        w.B.copy_(prepared.B)
        if prepared.weight is not None:
            view = layer.weight_view()
            view.copy_(prepared.weight.to(view.dtype))


def out_in(module: nn.Module, tensor: Tensor) -> Tensor:
    """`tensor`, laid out like `module`'s weight, as [out, in] (HF Conv1D stores [in, out])."""
    return tensor.T if find_kind(module).name == "hf_conv1d" else tensor


def out_features(module: nn.Module) -> int:
    """The output size of a linear base module (nn.Linear, HF Conv1D, a bitsandbytes linear)."""
    found = getattr(module, "out_features", None)
    return found if found is not None else out_in(module, module.weight).shape[0]


def call_model(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def collect_inputs(preparation: Preparation, on_input: Callable[[str, Tensor, Any], None], what: str) -> None:
    """Run every batch through the model in eval mode without gradients, the adapters off,
    calling ``on_input(path, x, batch)`` with each target's input (x as the module receives it)."""
    model = preparation.model
    current: list[Any] = [None]

    def hook_for(path: str):
        return lambda module, args, output: on_input(path, args[0].detach(), current[0])

    root = base_model_of(model)  # hook the module at each path: a LoRA layer may not call its base module
    handles = [root.get_submodule(path).register_forward_hook(hook_for(path)) for path, _ in preparation.targets]
    was_training = model.training
    model.eval()
    try:
        with preparation.adapters_off(), torch.no_grad():
            for batch in preparation.each_batch(what):
                current[0] = batch
                preparation.run(model, batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def keep_all(preparation: Preparation, factors: Callable[[str, nn.Module], Prepared]) -> LoraConfig:
    """`keep` ``factors(path, base)`` for every target, in module order; returns the config."""
    for path, module in preparation.targets:
        keep(factors(path, module), module)
    return preparation.config

