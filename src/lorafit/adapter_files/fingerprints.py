"""A fingerprint of the base model an adapter was trained on, to catch loading onto another one.

The fingerprint holds the model class, its ``model_type``, the shape of every targeted base
weight and a SHA-256 over a fixed sample of those weights (up to `SAMPLE` evenly spaced entries
per weight, rounded to bfloat16 so a model loaded in fp32, fp16 or bf16 hashes alike). Sampling
keeps it cheap for billion-parameter bases while any retraining, merge or swap of the base
changes it. A quantised (bitsandbytes) base is fingerprinted by its dequantised weights, so an
adapter trained on it matches a full-precision base rounded the same way (`prepare_merge_base`).
Weights with an adapter merged into them, or on the meta device, leave the hash out.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..errors import AdapterFileError
from ..layers import LoraLayer
from ..quant import dequantize_weight, is_quantized_linear
from ..registry import prepared_config
from ..surgery import module_target_paths
from .tensorfile import tensor_bytes

SAMPLE = 1024


class BaseModelMismatch(AdapterFileError):
    """The adapter's saved fingerprint differs from the model it is loaded onto (``strict=True``)."""


def fingerprint(root: nn.Module, module_paths: Iterable[str]) -> dict[str, Any]:
    """The fingerprint of `root` (the base model) for the targeted modules at `module_paths`."""
    digest = hashlib.sha256()
    hashable = True
    shapes = {}
    for path in sorted(set(module_paths)):
        module = root.get_submodule(path)
        if isinstance(module, LoraLayer):
            hashable = hashable and not module.merged
            module = module.base_layer
        weight = dequantize_weight(module) if is_quantized_linear(module) else module.weight
        shapes[path] = list(weight.shape)
        hashable = hashable and not weight.is_meta
        if hashable:
            digest.update(path.encode())
            digest.update(_sample_bytes(weight))
    config = getattr(root, "config", None)
    return {
        "architecture": type(root).__name__,
        "model_type": getattr(config, "model_type", None),
        "weights": shapes,
        "sample_sha256": digest.hexdigest() if hashable else None,
    }


def fingerprinted_paths(root: nn.Module, config: Any) -> list[str]:
    """The modules whose base weights an adapter's fingerprint covers, the same on saving and
    loading: those the (prepared) config's target_modules selects. The layers of the other
    target sources are left out: target_parameters and trainable tokens, and an output head
    whose LoRA is the embedding's (``ensure_weight_tying``), which an adapter file does not name
    as a target."""
    return sorted(module_target_paths(root, prepared_config(config, root)))


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How `current` differs from `saved`, in words (empty when they agree)."""
    found = []
    if saved.get("architecture") != current["architecture"]:
        found.append(f"the adapter was saved on a {saved.get('architecture')}, this model is a "
                     f"{current['architecture']}")
    saved_shapes: dict = saved.get("weights") or {}
    changed = [p for p, shape in current["weights"].items() if p in saved_shapes and saved_shapes[p] != shape]
    if changed:
        found.append(f"base weight shapes differ at {', '.join(changed[:3])}")
    ours, theirs = current["sample_sha256"], saved.get("sample_sha256")
    if not changed and ours and theirs and ours != theirs:
        found.append(f"the targeted base weights differ from those it was saved with "
                     f"(sampled hash {theirs[:12]}… vs {ours[:12]}…)")
    return found


def describe(saved: Optional[dict[str, Any]]) -> str:
    if not saved:
        return "none (not saved by lorafit)"
    digest = saved.get("sample_sha256")
    return (f"{saved.get('architecture')} ({saved.get('model_type')}), {len(saved.get('weights') or {})} "
            f"targeted weights, sampled hash {digest[:12] if digest else 'not recorded'}")


def _sample_bytes(weight: torch.Tensor) -> bytes:
    flat = weight.detach().reshape(-1)
    count = min(flat.numel(), SAMPLE)
    stride = flat.numel() // max(count, 1)
    index = torch.arange(count, device=flat.device) * stride
    values = flat[index].float().to(torch.bfloat16).view(torch.int16)
    return tensor_bytes(values)
