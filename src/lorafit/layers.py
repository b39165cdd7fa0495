"""LoRA layers. Each wraps its frozen base layer by composition and holds any number of named
adapters (`LoraWeights`), of which some are active.

For a base layer computing ``y = W x + b`` an active adapter adds ``s · B (A dropout(x))``
(Hu et al. 2021, eq. 3). Layer kinds differ only in how that product is applied to an input and
in how the base weight is laid out; both live in one small class per kind:

=================  ==================  ===================  ===============================
kind               A                   B                    base weight seen as [out, in]
=================  ==================  ===================  ===============================
`nn.Linear`        [r, in]             [out, r]             W
HF `Conv1D`        [r, in]             [out, r]             Wᵀ (stored [in, out])
`nn.Embedding`     [r, num]            [dim, r]             Wᵀ (stored [num, dim])
`nn.Conv1d/2d`     [r, in, *kernel]    [out, r, 1, ...]     W
=================  ==================  ===================  ===============================

Variants of the adapter maths (DoRA, ...) are subclasses of `LoraWeights`; quantised bases are
subclasses of a layer kind. Merging is always an explicit call, never tied to train()/eval().
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AdapterError, ConfigError, MergeError
from .functional import (WeightSource, delta_weight, frozen_linear, fused_lora_linear, lora_linear_delta,
                         merge_into)


class LoraWeights(nn.Module):
    """One adapter's trainable factors on one layer: ``ΔW = scaling · B A``."""

    def __init__(self, A: Tensor, B: Tensor, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        """ΔW in fp32, laid out [out, in(, *kernel)]."""
        return delta_weight(self.A, self.B, self.scaling)

    def apply(self, layer: "LoraLayer", x: Tensor, result: Tensor) -> Tensor:
        """The layer's output with this adapter: ``result + s · B A dropout(x)``."""
        return result + layer.lora_output(self.dropout(x), self)

    def merge(self, layer: "LoraLayer", safe: bool) -> None:
        """``W ← W + ΔW``; with `safe` a non-finite ΔW raises and W is left untouched."""
        if not merge_into(layer.weight_view(), self.delta(), 1.0, safe):
            raise MergeError("the adapter's ΔW holds NaN/Inf; the base weight was left untouched")

    def unmerge(self, layer: "LoraLayer") -> None:
        merge_into(layer.weight_view(), self.delta(), -1.0)

    def init_from_layer(self, layer: "LoraLayer") -> None:
        """Called once the factors are initialised; variants whose state depends on the base
        weight (DoRA's magnitude) set it up here."""


class RowAdapters:
    """Which adapter serves each row of a mixed batch (``None`` = the plain base).

    Built once per forward call and shared by every layer, so the index tensors are made once.
    """

    def __init__(self, names: Sequence[Optional[str]]):
        self.names = list(names)
        self.present = list(dict.fromkeys(n for n in self.names if n is not None))
        self._by_device: dict[torch.device, tuple[Tensor, list[tuple[str, Tensor]]]] = {}

    def indices(self, device: torch.device) -> tuple[Tensor, list[tuple[str, Tensor]]]:
        """(slot per row [b] with ``len(present)`` for base rows, [(name, rows of that name)])."""
        if device not in self._by_device:
            slot_of = {n: i for i, n in enumerate(self.present)}
            slots = torch.tensor([slot_of.get(n, len(self.present)) for n in self.names], device=device)
            groups = [(n, torch.nonzero(slots == i).flatten()) for i, n in enumerate(self.present)]
            self._by_device[device] = (slots, groups)
        return self._by_device[device]


# init_lora_weights schemes handled outside the core (PiSSA, OLoRA), by name ("pissa_niter_K"
# looks up "pissa"): function(layer, weights, scheme) that fills the factors.
INIT_HOOKS: dict[str, Callable] = {}


class LoraLayer(nn.Module):
    """Common machinery of every LoRA layer kind; subclasses define the geometry."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False
        self.rows: Optional[RowAdapters] = None

    # -- geometry, defined per kind ---------------------------------------------------------

    in_features: int
    out_features: int

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def lora_output(self, x: Tensor, w: LoraWeights) -> Tensor:
        """``s · B A x`` for this kind, in the dtype of x."""
        raise NotImplementedError

    def weight_view(self) -> Tensor:
        """The base weight as an [out, in(, *kernel)] view sharing its storage."""
        return self.base_layer.weight

    def init_factors(self, w: LoraWeights, scheme) -> None:
        """Initialise A and B: Kaiming-uniform A and zero B (True), N(0, 1/r) A (gaussian), or
        both random (False, an adapter that is not the identity at start). A scheme named in
        `INIT_HOOKS` is handed to its function."""
        hook = INIT_HOOKS.get(scheme.split("_niter_")[0]) if isinstance(scheme, str) else None
        if hook is not None:
            return hook(self, w, scheme)
        with torch.no_grad():
            if scheme == "gaussian":
                nn.init.normal_(w.A, std=1.0 / w.rank)
            else:
                nn.init.kaiming_uniform_(w.A, a=math.sqrt(5))
            if scheme is False:
                nn.init.kaiming_uniform_(w.B, a=math.sqrt(5))
            else:
                nn.init.zeros_(w.B)

    # -- adapters -------------------------------------------------------------------------------

    def add(self, name: str, weights: LoraWeights) -> None:
        ref = self._reference_tensor()
        self.lora[name] = weights.to(device=ref.device, dtype=_adapter_dtype(ref))

    def create(self, name: str, r: int, scaling: float, dropout: float, init,
               weights_cls: type[LoraWeights] = LoraWeights) -> LoraWeights:
        """Add a new adapter `name` of rank `r`, initialised by `init` (see `init_factors`)."""
        a_shape, b_shape = self.factor_shapes(r)
        w = weights_cls(torch.empty(a_shape), torch.empty(b_shape), scaling, dropout)
        self.add(name, w)
        self.init_factors(self.lora[name], init)
        self.lora[name].init_from_layer(self)
        return self.lora[name]

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge() first")
        del self.lora[name]
        self.active = tuple(a for a in self.active if a != name)

    def _reference_tensor(self) -> Tensor:
        return next(iter(self.base_layer.parameters()))

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

    def base_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The frozen base layer's output (a kind may compute it with its own kernel)."""
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.base_forward(x, *args, **kwargs)
        if self.rows is not None:
            return self._forward_rows(x, *args, **kwargs)
        result = self.base_forward(x, *args, **kwargs)
        for name in self.active:
            if name in self.lora and name not in self.merged:
                result = self.lora[name].apply(self, x, result)
        return result

    def _forward_rows(self, x: Tensor, *args, **kwargs) -> Tensor:
        """Mixed batch: row i uses adapter ``rows.names[i]``. Rows are grouped by adapter (a loop
        over the adapters present, never over rows); plain-LoRA kinds may override with a
        gathered batched matmul."""
        if self.merged:
            raise AdapterError("a mixed batch needs unmerged adapters; call unmerge() first")
        rows = self.rows
        if x.shape[0] != len(rows.names):
            raise AdapterError(f"adapter_names has {len(rows.names)} entries but the batch has {x.shape[0]} rows")
        result = self.base_forward(x, *args, **kwargs)
        _, groups = rows.indices(x.device)
        for name, idx in groups:
            if name in self.lora:
                result = result.index_put((idx,), self.lora[name].apply(self, x[idx], result[idx]))
        return result


def _adapter_dtype(ref: Tensor) -> torch.dtype:
    """Adapters live in the base's floating dtype; packed/int bases get fp32 adapters."""
    return ref.dtype if ref.is_floating_point() and ref.element_size() >= 2 else torch.float32


class LoraLinear(LoraLayer):
    """LoRA on `nn.Linear` or Hugging Face `Conv1D` (``fan_in_fan_out``: weight stored [in, out])."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        weight = base_layer.weight
        if fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.in_features = getattr(base_layer, "in_features", None) or weight.shape[1]
            self.out_features = getattr(base_layer, "out_features", None) or weight.shape[0]

    def factor_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def weight_view(self) -> Tensor:
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def lora_output(self, x: Tensor, w: LoraWeights) -> Tensor:
        out = lora_linear_delta(x.to(w.A.dtype), w.A, w.B, w.scaling)
        return out.to(x.dtype)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        w = self._fusable()
        if w is None or x.dtype != w.A.dtype:
            return super().forward(x, *args, **kwargs)
        p = w.dropout.p if self.training and isinstance(w.dropout, nn.Dropout) else 0.0
        return fused_lora_linear(x, self.kernel_weight(), self.base_layer.bias, w.A, w.B, w.scaling, p,
                                 self.fan_in_fan_out)

    def base_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """A base with a `kernel_weight` runs through `frozen_linear`, the kernel call of the fused
        path, so merged, disabled and mixed-batch forwards are as fast as the single-adapter one."""
        weight = self.kernel_weight()
        dtype = weight.dtype if isinstance(weight, Tensor) else torch.float32  # a function makes fp32
        if (weight is None or args or kwargs or x.dtype != dtype
                or torch.is_autocast_enabled(x.device.type)):
            return super().base_forward(x, *args, **kwargs)
        return frozen_linear(x, weight, self.base_layer.bias, self.fan_in_fan_out)

    def kernel_weight(self) -> Optional[WeightSource]:
        """The frozen base weight for lorafit's kernels, laid out as stored ([out, in], or [in, out]
        with `fan_in_fan_out`): a plain `nn.Linear` / `Conv1D` base's weight, or None when the
        base layer has to run itself (a trainable weight, other module types). Quantised kinds
        may return a function that dequantises it."""
        base = self.base_layer
        if not (type(base) is nn.Linear or _is_hf_conv1d(base)) or base.weight.requires_grad:
            return None
        return base.weight

    def _fusable(self) -> Optional[LoraWeights]:
        """The single plain adapter to run through the fused kernel, or None when the general
        path is needed (mixed rows, several or merged adapters, variants, quantised or trainable
        base weights)."""
        if self.disabled or self.rows is not None or len(self.active) != 1 or self.merged:
            return None
        w = self.lora[self.active[0]] if self.active[0] in self.lora else None
        if type(w) is not LoraWeights or self.kernel_weight() is None:
            return None
        return w

    def _forward_rows(self, x: Tensor, *args, **kwargs) -> Tensor:
        weights = [self.lora[n] for n in self.rows.present if n in self.lora]
        gatherable = all(type(w) is LoraWeights for w in weights) and not (
            self.training and any(not isinstance(w.dropout, nn.Identity) for w in weights))
        if not gatherable or self.merged or x.shape[0] != len(self.rows.names):
            return super()._forward_rows(x, *args, **kwargs)
        return self.base_forward(x, *args, **kwargs) + self._gathered_delta(x)

    def _gathered_delta(self, x: Tensor) -> Tensor:
        """``s_i · B_i A_i x_i`` for every row i at once: the adapters' factors are zero-padded
        to a common rank, stacked (with a zero slot for base rows), gathered per row and applied
        with two batched matmuls (the Punica / S-LoRA idea)."""
        rows = self.rows
        slots, _ = rows.indices(x.device)
        weights = [self.lora[n] if n in self.lora else None for n in rows.present]
        r_max = max((w.rank for w in weights if w is not None), default=1)
        dtype = next((w.A.dtype for w in weights if w is not None), x.dtype)
        zero_a = x.new_zeros((r_max, self.in_features), dtype=dtype)
        zero_b = x.new_zeros((self.out_features, r_max), dtype=dtype)
        a_stack = torch.stack([zero_a if w is None else F.pad(w.A, (0, 0, 0, r_max - w.rank))
                               for w in weights] + [zero_a])  # (n+1, r_max, in)
        b_stack = torch.stack([zero_b if w is None else F.pad(w.B * w.scaling, (0, r_max - w.rank))
                               for w in weights] + [zero_b])  # (n+1, out, r_max)
        xb = x.reshape(x.shape[0], -1, self.in_features).to(dtype)  # (b, T, in)
        h = torch.bmm(xb, a_stack[slots].transpose(1, 2))  # (b, T, r_max)
        out = torch.bmm(h, b_stack[slots].transpose(1, 2))  # (b, T, out)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on `nn.Embedding`: ``E' = E + s · (B A)ᵀ`` with A [r, num], B [dim, r]."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def factor_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def weight_view(self) -> Tensor:
        return self.base_layer.weight.T

    def init_factors(self, w: LoraWeights, scheme) -> None:
        """PEFT's embedding init: A zero and B normal (True/"gaussian"), so ΔE starts at zero
        while B gets gradients; False makes both random."""
        with torch.no_grad():
            if scheme is False:
                nn.init.normal_(w.A)
            else:
                nn.init.zeros_(w.A)
            nn.init.normal_(w.B)

    def lora_output(self, x: Tensor, w: LoraWeights) -> Tensor:
        base = self.base_layer
        h = F.embedding(x, w.A.T, base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)  # (..., r)
        return (h @ w.B.T) * w.scaling


class LoraConv(LoraLayer):
    """LoRA on `nn.Conv1d` / `nn.Conv2d`: A is a conv with the base's kernel, stride, padding and
    dilation mapping in -> r channels, B a 1×1 conv r -> out."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ConfigError(f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported")
        if base_layer.padding_mode != "zeros":
            raise ConfigError(f"LoRA on a convolution with padding_mode={base_layer.padding_mode!r} is not supported")
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._conv: Callable = F.conv1d if isinstance(base_layer, nn.Conv1d) else F.conv2d

    def factor_shapes(self, r):
        kernel = tuple(self.base_layer.kernel_size)
        return (r, self.in_features, *kernel), (self.out_features, r, *([1] * len(kernel)))

    def lora_output(self, x: Tensor, w: LoraWeights) -> Tensor:
        base = self.base_layer
        h = self._conv(x.to(w.A.dtype), w.A, None, base.stride, base.padding, base.dilation)
        return (self._conv(h, w.B) * w.scaling).to(x.dtype)


class LayerKind:
    """One row of the kind table: which base modules it matches and how to wrap them."""

    def __init__(self, matches: Callable[[nn.Module], bool], wrap: Callable[[nn.Module], LoraLayer],
                 linear: bool = False):
        self.matches, self.wrap, self.linear = matches, wrap, linear


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2), recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


# Checked in order; `register_kind` puts new kinds (e.g. quantised linears) first.
LAYER_KINDS: list[LayerKind] = [
    LayerKind(lambda m: isinstance(m, nn.Linear), LoraLinear, linear=True),
    LayerKind(_is_hf_conv1d, lambda m: LoraLinear(m, fan_in_fan_out=True), linear=True),
    LayerKind(lambda m: isinstance(m, nn.Embedding), LoraEmbedding),
    LayerKind(lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d)), LoraConv),
]


def register_kind(kind: LayerKind) -> None:
    """Add a layer kind ahead of the built-in ones (so a subclass of nn.Linear can claim it)."""
    LAYER_KINDS.insert(0, kind)


def find_kind(module: nn.Module) -> Optional[LayerKind]:
    return next((kind for kind in LAYER_KINDS if kind.matches(module)), None)


class ModulesToSave(nn.Module):
    """A whole module trained per adapter (e.g. a freshly initialised classification head).

    Holds the frozen `original_module` and one trainable deep copy per adapter in
    `modules_to_save` (PEFT's names, so checkpoints line up); the first active adapter with a
    copy is used, else the original.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.rows: Optional[RowAdapters] = None

    def add(self, name: str) -> nn.Module:
        copy_ = copy.deepcopy(self.original_module)
        self.modules_to_save[name] = copy_
        return copy_

    def remove(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active = tuple(a for a in self.active if a != name)

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: Tensor, *args, **kwargs):
        if self.rows is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        _, groups = self.rows.indices(x.device)
        for name, idx in groups:
            if name in self.modules_to_save:
                result = result.index_put((idx,), self.modules_to_save[name](x[idx], *args, **kwargs))
        return result
