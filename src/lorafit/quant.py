"""Quantised frozen bases (QLoRA, Dettmers et al. 2023) through bitsandbytes, on CPU or GPU.

`quantize_model` swaps a model's `nn.Linear` layers for bitsandbytes ``Linear4bit`` (NF4 / FP4,
blockwise, optionally with double quantisation of the block scales, §2 of the QLoRA paper) or
``Linear8bitLt`` (LLM.int8(), row-wise absmax). `lorafit.wrap` then puts a `QuantLoraLinear` around
each targeted quantised layer: the base stays packed and frozen, the adapters are fp32 and the
forward is ``y = base(x) + s · B A x`` with ``base(x) = dequant(W_q) x + b``.

Merging needs a weight to add ΔW to:

* ``merge_and_unload(dequantize=True)`` (`dequantize_model`) first replaces every quantised layer by
  a plain `nn.Linear` holding ``dequant(W_q)``; the merge is then exact: the merged model computes
  what the quantised model with its adapter computed (the recommended way);
* merging in place (`QuantLoraLinear.merge`) re-quantises ``dequant(W_q) + ΔW``, which rounds ΔW
  away to a large extent; it warns and records the size of that rounding as the largest change of
  the layer's output on a fixed random probe batch (`requantization_report`).

An adapter trained on a quantised base learned ΔW against ``dequant(W_q)``, not W. To merge it into
a full-precision base file (the `lorafit merge` command), load the base in full precision, call
``prepare_merge_base(base, quantization)`` with the `describe_quantization` record saved with the
adapter (it rounds the same layers through the same quantiser, so ``W ← dequant(quant(W))``), then
wrap, load and ``merge_and_unload()`` as usual: the merged model reproduces the trained one.
Merging into the unrounded W instead adds the quantisation error to the result.

bitsandbytes is optional: it is imported only when a quantised model is built or met.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .kinds.linear import LoraLinear
from .layers import LoraLayer, LoraWeights, ModulesToSave, base_model_of
from .surgery import has_suffix, replace_module

QUANT_MODES = ("nf4", "fp4", "int8")
PROBE_ROWS = 8  # rows of the random probe batch used to measure re-quantisation error


def _bnb():
    try:
        import bitsandbytes
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("quantisation needs bitsandbytes: pip install 'lorafit[quant]'") from None
    return bitsandbytes


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_4bit(module: nn.Module) -> bool:
    return type(module.weight).__name__ == "Params4bit"


def quant_mode(module: nn.Module) -> str:
    return module.weight.quant_type if is_4bit(module) else "int8"


# -- quantising --------------------------------------------------------------------------------


def quantize_model(model: nn.Module, mode: str = "nf4", double_quant: bool = False,
                   compute_dtype: torch.dtype = torch.float32, skip: Sequence[str] = ("lm_head",),
                   blocksize: int = 64) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by its bitsandbytes counterpart.

    mode: ``"nf4"`` / ``"fp4"`` (4-bit, one absmax per `blocksize` weights; `double_quant`
    quantises those absmax values to 8 bits too, QLoRA §2) or ``"int8"`` (one scale per output
    row; `double_quant`, `blocksize` and `compute_dtype` do not apply). `skip` names layers kept in
    full precision (exact name or dotted suffix, e.g. the output head). 4-bit layers compute in
    `compute_dtype`; with float32 the AVX512-BF16 CPU kernel (which rounds the block scales to bf16
    and computes in bf16) is turned off so inference computes exactly what training did.
    Returns `model`.
    """
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantize mode {mode!r} is invalid: expected one of {list(QUANT_MODES)}")
    if any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules()):
        raise ConfigError("quantize_model: the model already has LoRA layers; quantise the base before wrap()")
    _bnb()
    for name, module in _plain_linears(model, skip):
        replace_module(model, name, _quantized_linear(module, mode, double_quant, compute_dtype, blocksize))
    return model


def _plain_linears(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not is_quantized_linear(m) and not has_suffix(name, list(skip or ()))]


def _quantized_linear(linear: nn.Linear, mode: str, double_quant: bool, compute_dtype: torch.dtype,
                      blocksize: int, weight_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantised (quantisation happens on ``.to``)."""
    bnb = _bnb()
    device = linear.weight.device
    weight = linear.weight.detach().to("cpu", dtype=weight_dtype or linear.weight.dtype)
    has_bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type=mode, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                                         compress_statistics=double_quant, quant_type=mode,
                                         module=layer).to(device)
        if compute_dtype != torch.bfloat16:
            layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def dequantize_weight(module: nn.Module) -> Tensor:
    """``dequant(W_q)`` of a bitsandbytes linear as a new fp32 tensor [out, in]."""
    bnb = _bnb()
    weight = module.weight
    if is_4bit(module):
        state = weight.quant_state if weight.quant_state is not None else module.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpack_cpu_format(data, state)
        return bnb.functional.dequantize_4bit(data, state).float()
    if weight.dtype != torch.int8:  # has_fp16_weights: not quantised in storage
        return weight.detach().float().clone()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()


def _unpack_cpu_format(data: Tensor, state):
    """Undo bitsandbytes' AVX512-BF16 inference packing on copies (the layer is left as it is):
    the packed layout keeps bf16 block scales, which are exactly what that kernel multiplies by."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    copy_ = copy.copy(state)
    copy_.original_nested = False  # keep the bf16 scales instead of re-quantising them
    qweight, _ = _convert_weight_packed_for_cpu_inverse(data.clone(), copy_)
    copy_.absmax = state.absmax.T.reshape(-1).float()
    copy_.nested, copy_.dtype = False, state.original_dtype
    return qweight, copy_


def requantize(module: nn.Module, weight: Tensor) -> None:
    """Store `weight` ([out, in], fp32) in `module` quantised with the module's own settings."""
    bnb = _bnb()
    old = module.weight
    device = old.device
    if is_4bit(module):
        state = old.quant_state if old.quant_state is not None else module.quant_state
        dtype = getattr(state, "original_dtype", None) or state.dtype
        module.weight = bnb.nn.Params4bit(weight.detach().to("cpu", dtype), requires_grad=False,
                                          blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                          quant_type=old.quant_type, quant_storage=old.quant_storage,
                                          module=module).to(device)
    else:
        module.weight = bnb.nn.Int8Params(weight.detach().cpu(), requires_grad=False,
                                          has_fp16_weights=False).to(device)
        module.state.CB = module.state.SCB = None


def requantization_report(model: nn.Module) -> dict[str, float]:
    """{module path: output error of the last in-place merge/unmerge} for quantised LoRA layers."""
    return {name: m.requantization_error for name, m in base_model_of(model).named_modules()
            if isinstance(m, LoraLayer) and getattr(m, "requantization_error", None) is not None}


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace (in place) every bitsandbytes linear of `model` — bare or as the base of a
    `QuantLoraLinear` — by an `nn.Linear` holding ``dequant(W_q)`` in `dtype` (default: the
    dtype of the model's other floating-point parameters, else float32). LoRA layers become plain
    `LoraLinear`s keeping their adapters, active set and merged state. Returns `model`.
    """
    dtype = dtype or float_dtype(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear) and is_quantized_linear(module.base_layer):
            plain = LoraLinear(_dense(module.base_layer, dtype))
            plain.lora, plain.active, plain.merged = module.lora, module.active, list(module.merged)
            plain.router = module.router
            plain.train(module.training)
            replace_module(model, name, plain)
    for name, module in list(model.named_modules()):
        if is_quantized_linear(module):
            replace_module(model, name, _dense(module, dtype))
    return model


def _dense(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight = dequantize_weight(module)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    linear.train(module.training)
    return linear


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of most of the model's floating-point base parameters (adapters and quantised
    weights not counted)."""
    counts: dict[torch.dtype, int] = {}
    for module in model.modules():
        if is_quantized_linear(module) or isinstance(module, LoraWeights):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


# -- describing, simulating, measuring ---------------------------------------------------------


def describe_quantization(model: nn.Module) -> Optional[dict[str, Any]]:
    """How `model`'s base was quantised, as plain data for adapter metadata, or None.

    ``{"mode": "nf4", "double_quant": bool, "blocksize": int, "weight_dtype": "float32",
    "compute_dtype": "float32" | None, "skip": [paths of linear layers left in full precision]}``;
    `prepare_merge_base` takes it back.
    """
    quantized, plain = [], []
    for name, module in _base_modules(base_model_of(model)):
        if is_quantized_linear(module):
            quantized.append(module)
        elif isinstance(module, nn.Linear):
            plain.append(name)
    if not quantized:
        return None
    first = quantized[0]
    record: dict[str, Any] = {"mode": quant_mode(first), "skip": plain}
    if is_4bit(first):
        state = first.weight.quant_state if first.weight.quant_state is not None else first.quant_state
        record.update(
            double_quant=bool(first.weight.compress_statistics), blocksize=int(first.weight.blocksize),
            weight_dtype=str(getattr(state, "original_dtype", None) or state.dtype).replace("torch.", ""),
            compute_dtype=str(first.compute_dtype).replace("torch.", "") if first.compute_dtype else None)
    return record


def simulate_quantization(model: nn.Module, mode: str = "nf4", double_quant: bool = False,
                          skip: Sequence[str] = ("lm_head",), blocksize: int = 64,
                          weight_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``W ← dequant(quant(W))`` in place for the layers `quantize_model` would quantise, through
    the same quantiser, so the model keeps plain full-precision layers but computes what its
    quantised twin computes. Returns `model`."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantize mode {mode!r} is invalid: expected one of {list(QUANT_MODES)}")
    for _, linear in _plain_linears(model, skip):
        rounded = dequantize_weight(_quantized_linear(linear, mode, double_quant, torch.float32,
                                                      blocksize, weight_dtype))
        with torch.no_grad():
            linear.weight.copy_(rounded.to(linear.weight.dtype))
    return model


def quantize_like(model: nn.Module, quantization: Optional[Mapping[str, Any]]) -> nn.Module:
    """Quantise a full-precision base as the `describe_quantization` record says the adapter's
    base was (None: nothing to do), so inference runs on the base the adapter was trained on."""
    if not quantization or quantization == "none":
        return model
    if isinstance(quantization, str):
        quantization = {"mode": quantization}
    compute = quantization.get("compute_dtype")
    return quantize_model(model, quantization.get("mode", "nf4"), bool(quantization.get("double_quant", False)),
                          getattr(torch, compute) if compute else torch.float32,
                          skip=quantization.get("skip", ("lm_head",)), blocksize=int(quantization.get("blocksize", 64)))


def prepare_merge_base(model: nn.Module, quantization: Optional[Mapping[str, Any]],
                       match_training: bool = True) -> nn.Module:
    """Make a full-precision base ready for merging an adapter trained on a quantised base.

    `quantization` is the adapter's `describe_quantization` record (None / "none": nothing to
    do). With `match_training` the base is rounded through the quantiser it was trained on
    (`simulate_quantization`), so ``base + ΔW`` is the trained model up to fp rounding; without,
    the base is left as loaded (the merged model then also differs by the quantisation error).
    """
    if not quantization or quantization == "none" or not match_training:
        return model
    if isinstance(quantization, str):
        quantization = {"mode": quantization}
    dtype = quantization.get("weight_dtype")
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ConfigError(f"quantization.weight_dtype = {dtype!r} is not a torch dtype")
    return simulate_quantization(
        model, mode=quantization.get("mode", "nf4"), double_quant=bool(quantization.get("double_quant", False)),
        skip=quantization.get("skip", ("lm_head",)), blocksize=int(quantization.get("blocksize", 64)),
        weight_dtype=getattr(torch, dtype) if dtype else None)


def base_memory_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base held in memory: parameters, buffers and bitsandbytes quantisation
    state (4-bit block scales, nested scales and code tables; int8 row scales), each storage
    counted once. Adapter factors and modules-to-save copies are excluded."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def count(t: Optional[Tensor]) -> None:
        nonlocal total
        if isinstance(t, Tensor) and t.device.type != "meta":
            key = (t.data_ptr(), t.numel() * t.element_size())
            if key not in seen:
                seen.add(key)
                total += key[1]

    for _, module in _base_modules(model, leaves_only=False):
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            count(t)
            for q in _quant_tensors(t):
                count(q)
        state = getattr(module, "state", None)
        if is_quantized_linear(module) and state is not None and hasattr(state, "SCB"):
            count(state.SCB)
            count(state.CB)
    return total


def _quant_tensors(t: Tensor) -> list[Tensor]:
    state = getattr(t, "quant_state", None)
    found = [getattr(t, "SCB", None)]
    while state is not None:
        found += [state.absmax, state.code, getattr(state, "offset", None)]
        state = getattr(state, "state2", None)
    return [x for x in found if isinstance(x, Tensor)]


def _base_modules(model: nn.Module, prefix: str = "", leaves_only: bool = True):
    """(path, module) of the base model: a LoRA layer counts as its base layer, a modules-to-save
    wrapper as its original module; adapters are not entered."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, LoraLayer):
            child = child.base_layer
        elif isinstance(child, ModulesToSave):
            child = child.original_module
        if not leaves_only or not list(child.children()):
            yield path, child
        yield from _base_modules(child, path, leaves_only)
    if not prefix and not leaves_only:
        yield "", model


__all__ = [
    "QUANT_MODES", "quantize_model", "dequantize_model", "dequantize_weight",
    "is_quantized_linear", "describe_quantization", "simulate_quantization", "prepare_merge_base",
    "base_memory_bytes", "requantization_report", "quantize_like", "float_dtype",
]
