"""The LoRA layer machinery shared by every layer kind and variant.

A LoRA layer wraps its frozen base layer by composition and holds any number of named adapters
(`LoraWeights`), of which some are active. For a base layer computing ``y = W x + b`` an active
adapter adds ``s · B (A dropout(x))`` (Hu et al. 2021, eq. 3). The kinds (``lorafit/kinds/``)
differ only in the geometry:

=================  ==================  ===================  ===============================
kind               A                   B                    base weight seen as [out, in]
=================  ==================  ===================  ===============================
`nn.Linear`        [r, in]             [out, r]             W
HF `Conv1D`        [r, in]             [out, r]             Wᵀ (stored [in, out])
`nn.Embedding`     [r, num]            [dim, r]             Wᵀ (stored [num, dim])
`nn.Conv1d/2d`     [r, in, *kernel]    [out, r, 1, ...]     W
=================  ==================  ===================  ===============================

Variants of the adapter maths (``lorafit/variants/``) are subclasses of `LoraWeights` and act
through its methods (`LoraWeights.apply`, `merge`, `unmerge`). `LoraLayer.forward` picks one of
a few paths in one place (`LoraLayer.path`); which adapters it uses in this call comes from the
model's `Router` (`lorafit.routing`). Merging is always an explicit call, never tied to
train()/eval().
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import AdapterError, MergeError
from .functional import WeightSource, delta_weight, dropout, fused_dtype, merge_into
from .registry import Variant, find_init
from .routing import Route, Router


class LoraWeights(nn.Module):
    """One adapter's trainable factors on one layer: ``ΔW = scaling · B A``.

    `scaling` is set from the adapter's config when the adapter is created (or loaded) and never
    changed behind it. `dropout_p` is the dropout rate on the adapter's input while training.
    Class flags tell the layer which fast paths this maths fits: `fusable` (the fused linear
    kernel computes exactly ``W x + b + s·B A dropout(x)``) and `gatherable` (mixed batches may
    stack its factors with other adapters').
    """

    fusable = True
    gatherable = True

    def __init__(self, A: Tensor, B: Tensor, scaling: float, dropout_p: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.scaling = float(scaling)
        self.dropout_p = float(dropout_p)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def dropping(self) -> bool:
        return self.training and self.dropout_p > 0

    def dropped(self, x: Tensor) -> Tensor:
        """dropout(x) while training, else x (see `lorafit.functional.dropout`)."""
        return dropout(x, self.dropout_p) if self.dropping else x

    def delta(self) -> Tensor:
        """ΔW in fp32, laid out [out, in(, *kernel)]."""
        return delta_weight(self.A, self.B, self.scaling)

    def apply(self, layer: "LoraLayer", x: Tensor, result: Tensor, result_is_base: bool) -> Tensor:
        """The layer's output with this adapter: ``result + s · B A dropout(x)``, in result's dtype.

        `result_is_base` says whether `result` is exactly the base layer's output for x (variants
        whose update depends on the base output may reuse it then)."""
        return result + layer.lora_output(self.dropped(x), self).to(result.dtype)

    def merge(self, layer: "LoraLayer", safe: bool) -> None:
        """``W ← W + ΔW``; with `safe` a non-finite ΔW raises and W is left untouched."""
        if not merge_into(layer.weight_view(), self.delta(), 1.0, safe):
            raise MergeError("the adapter's ΔW holds NaN/Inf; the base weight was left untouched")

    def unmerge(self, layer: "LoraLayer") -> None:
        merge_into(layer.weight_view(), self.delta(), -1.0)

    def merged_with(self, layer: "LoraLayer") -> "LoraWeights":
        """The adapter weights whose merge writes this adapter's ΔW into `layer`'s base weight:
        these, or another layer's that shares the weight and has the same ΔW (a tied output
        head's embedding adapter, `lorafit.kinds.tying`)."""
        return self

    def merged_elsewhere(self, layer: "LoraLayer") -> bool:
        """Whether another layer's merge already writes this adapter's ΔW into `layer`'s base
        weight, which the two share: merging it here changes nothing."""
        return self.merged_with(layer) is not self

    def init_from_layer(self, layer: "LoraLayer") -> None:
        """Called once the factors are initialised; variants whose state depends on the base
        weight (DoRA's magnitude) set it up here."""


class LoraLayer(nn.Module):
    """Common machinery of every LoRA layer kind; subclasses define the geometry."""

    in_features: int
    out_features: int

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.router = Router()

    # -- geometry, defined per kind ---------------------------------------------------------

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def lora_output(self, x: Tensor, w: LoraWeights) -> Tensor:
        """``s · B A x`` for this kind."""
        raise NotImplementedError

    def weight_view(self) -> Tensor:
        """The base weight as an [out, in(, *kernel)] view sharing its storage."""
        return self.base_layer.weight

    def per_output(self, vector: Tensor, like: Tensor) -> Tensor:
        """An [out] vector shaped to broadcast over an output `like` (outputs on the last dim)."""
        return vector

    def reset_factors(self, w: LoraWeights, value) -> None:
        """The default initialisations: Kaiming-uniform A and zero B (True), N(0, 1/r) A and zero B
        ("gaussian"), or both random (False, an adapter that is not the identity at start)."""
        with torch.no_grad():
            if value == "gaussian":
                nn.init.normal_(w.A, std=1.0 / w.rank)
            else:
                nn.init.kaiming_uniform_(w.A, a=math.sqrt(5))
            if value is False:
                nn.init.kaiming_uniform_(w.B, a=math.sqrt(5))
            else:
                nn.init.zeros_(w.B)

    def kernel_weight(self) -> Optional[WeightSource]:
        """The frozen base weight for lorafit's fused kernels, or None (only linear kinds have one)."""
        return None

    # -- adapters -------------------------------------------------------------------------------

    def add(self, name: str, weights: LoraWeights) -> None:
        ref = next(iter(self.base_layer.parameters()))
        self.lora[name] = weights.to(device=ref.device, dtype=adapter_dtype(ref))

    def create(self, name: str, r: int, scaling: float, dropout: float = 0.0, init=True,
               variant: Optional[Variant] = None) -> LoraWeights:
        """Add a new adapter `name` of rank `r`, of `variant` (None: plain LoRA), with its factors
        filled by the `init_lora_weights` scheme `init` (`lorafit.registry.find_init`)."""
        a_shape, b_shape = self.factor_shapes(r)
        cls = variant.weights if variant is not None else LoraWeights
        self.add(name, cls(torch.empty(a_shape), torch.empty(b_shape), scaling, dropout))
        w = self.lora[name]
        find_init(init).init(self, w, init)
        w.init_from_layer(self)
        return w

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge() first")
        del self.lora[name]
        self.active = tuple(a for a in self.active if a != name)

    # -- merging --------------------------------------------------------------------------------

    def merge(self, names: Sequence[str], safe: bool = False) -> None:
        for name in names:
            if name in self.lora and name not in self.merged:
                try:
                    self.lora[name].merge(self, safe)
                except MergeError as exc:
                    raise MergeError(f"merging adapter {name!r}: {exc}") from None
                self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self.lora[self.merged.pop()].unmerge(self)

    # -- forward --------------------------------------------------------------------------------

    def running(self, route: Route) -> list[str]:
        """The unmerged adapters of this layer that the route's active set names."""
        active = self.active if route.active is None else route.active
        lora, merged = self.lora, self.merged
        return [n for n in active if n in lora and n not in merged]

    def path(self, x: Tensor, route: Route) -> str:
        """How this call is computed: the one place that decides.

        * ``"base"``: the route disables adapters, or none of the active ones is unmerged here;
        * ``"rows"``: a mixed batch; ``"gathered"`` when every adapter present stacks
          (`LoraWeights.gatherable`, no dropout running) and the kind gathers (linear);
        * ``"fused"``: one running adapter whose maths the fused kernel computes
          (`LoraWeights.fusable`), a base weight the kernel reads (`kernel_weight`), and either
          autocast on (the kernel computes in its dtype) or the input in the adapter's dtype
          (`lorafit.functional.fused_dtype`);
        * ``"stacked"``: the base output, then each running adapter's `LoraWeights.apply`.
        """
        if route.disabled:
            return "base"
        if route.rows is not None:
            if self.merged:
                raise AdapterError("a mixed batch needs unmerged adapters; call unmerge() first")
            if x.shape[0] != len(route.rows.names):
                raise AdapterError(f"adapter_names has {len(route.rows.names)} entries but the batch has "
                                   f"{x.shape[0]} rows")
            present = [self.lora[n] for n in route.rows.present if n in self.lora]
            if self.gathers and all(w.gatherable and not w.dropping for w in present):
                return "gathered"
            return "rows"
        running = self.running(route)
        if not running:
            return "base"
        w = self.lora[running[0]]
        if (len(running) == 1 and w.fusable and fused_dtype(x, w.A) is not None
                and self.kernel_weight() is not None):
            return "fused"
        return "stacked"

    gathers = False  # the kind implements `forward_gathered`

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        route = self.router.route
        path = self.path(x, route)
        if path == "base":
            return self.base_forward(x, *args, **kwargs)
        if path == "fused":
            return self.forward_fused(x, self.lora[self.running(route)[0]])
        if path == "gathered":
            return self.forward_gathered(x, route.rows, self.base_forward(x, *args, **kwargs))
        if path == "rows":
            return self.forward_rows(x, route, *args, **kwargs)
        result = self.base_forward(x, *args, **kwargs)
        for i, name in enumerate(self.running(route)):
            result = self.lora[name].apply(self, x, result, result_is_base=i == 0 and not self.merged)
        return result

    def base_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The frozen base layer's output (a kind may compute it with its own kernel)."""
        return self.base_layer(x, *args, **kwargs)

    def forward_fused(self, x: Tensor, w: LoraWeights) -> Tensor:
        raise NotImplementedError  # only kinds with a kernel_weight reach the fused path

    def forward_gathered(self, x: Tensor, rows, base: Tensor) -> Tensor:
        """A mixed batch's output: `base`, the base layer's output, plus each row's adapter."""
        raise NotImplementedError  # only kinds that set `gathers`

    def forward_rows(self, x: Tensor, route: Route, *args, **kwargs) -> Tensor:
        """Mixed batch: row i uses adapter ``rows.names[i]``. Rows are grouped by adapter (a loop
        over the adapters present, never over rows)."""
        result = self.base_forward(x, *args, **kwargs)
        _, groups = route.rows.indices(x.device)
        for name, idx in groups:
            if name in self.lora:
                result = result.index_put((idx,), self.lora[name].apply(self, x[idx], result[idx], result_is_base=True))
        return result


def adapter_dtype(ref: Tensor) -> torch.dtype:
    """Adapters are fp32 on fp32, bf16, fp16 and packed/int bases (as PEFT's default
    ``autocast_adapter_dtype``): their updates are small and would round away in 8 bits of
    mantissa. An fp64 base gets fp64 adapters."""
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


class ModulesToSave(nn.Module):
    """A whole module trained per adapter (e.g. a freshly initialised classification head).

    Holds the frozen `original_module` and one trainable deep copy per adapter in
    `modules_to_save` (PEFT's names, so checkpoints line up); the first active adapter with a
    copy is used, else the original. Routing as in `LoraLayer`.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.router = Router()

    def add(self, name: str, weight: Optional[nn.Parameter] = None) -> nn.Module:
        """A trainable copy of the original for adapter `name`; with `weight`, the copy uses that
        parameter as its ``weight`` instead of a copy of its own (a tied output head's copy shares
        the input embedding's copy, `lorafit.kinds.tying`)."""
        original = self.original_module
        memo = {id(original.weight): weight} if weight is not None else None
        copy_ = copy.deepcopy(original, memo)
        self.modules_to_save[name] = copy_
        return copy_

    def remove(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active = tuple(a for a in self.active if a != name)

    def current(self, route: Optional[Route] = None) -> nn.Module:
        route = route or self.router.route
        if not route.disabled:
            for name in self.active if route.active is None else route.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: Tensor, *args, **kwargs):
        route = self.router.route
        if route.rows is None or route.disabled:
            return self.current(route)(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        _, groups = route.rows.indices(x.device)
        for name, idx in groups:
            if name in self.modules_to_save:
                result = result.index_put((idx,), self.modules_to_save[name](x[idx], *args, **kwargs))
        return result


def base_model_of(model: nn.Module) -> nn.Module:
    """The base model inside a `LoraModel` (a module with a `Router` and a ``model`` child), else
    `model` itself; module paths are then the base model's."""
    inner = model._modules.get("model")
    return inner if inner is not None and isinstance(model.__dict__.get("router"), Router) else model
