"""LoRA around a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base (QLoRA): see `lorafit.quant`."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..quant import PROBE_ROWS, dequantize_weight, is_4bit, is_quantized_linear, quant_mode, requantize
from ..registry import LayerKind
from .linear import LoraLinear


class QuantLoraLinear(LoraLinear):
    """LoRA around a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.

    The forward is LoraLinear's (``base(x) + s · B A x``, adapters in fp32); `weight_view` returns
    ``dequant(W_q)`` [out, in], a new tensor, so variants that read the base weight (DoRA's
    row norms) work unchanged. Merges edit an fp32 copy and re-quantise it (see `merge`).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self._scratch: Optional[Tensor] = None
        self.requantization_error: Optional[float] = None

    @property
    def quant_mode(self) -> str:
        return quant_mode(self.base_layer)

    def weight_view(self) -> Tensor:
        return self._scratch if self._scratch is not None else dequantize_weight(self.base_layer)

    def kernel_weight(self) -> Optional[Callable[[], Tensor]]:
        """While training, a 4-bit base computing in fp32 runs through lorafit's kernels with
        ``dequant(W_q)``, made in the forward and again in the backward: what bitsandbytes computes
        too, with the fused adapter node's memory savings. Inference keeps bitsandbytes' own
        kernels (single-token gemv); int8 bases quantise the input too, so they always run themselves."""
        base = self.base_layer
        if not (torch.is_grad_enabled() and is_4bit(base) and base.compute_dtype in (None, torch.float32)):
            return None
        return functools.partial(dequantize_weight, base)

    def merge(self, names: Sequence[str], safe: bool = False) -> None:
        """Merge into ``dequant(W_q)`` in fp32, then re-quantise.

        The re-quantisation rounds ``W + ΔW`` to the 4-/8-bit grid, so most of a small ΔW is lost.
        The error is measured as ``max |x (W + ΔW)ᵀ - x dequant(quant(W + ΔW))ᵀ|`` on a fixed
        N(0, 1) probe batch x [8, in], stored in `requantization_error` and reported in a
        warning. ``merge_and_unload(dequantize=True)`` merges exactly instead.
        """
        if any(n in self.lora and n not in self.merged for n in names):
            with self._editing("merging"):
                super().merge(names, safe)

    def unmerge(self) -> None:
        if self.merged:
            with self._editing("unmerging"):
                super().unmerge()

    @contextlib.contextmanager
    def _editing(self, what: str) -> Iterator[None]:
        self._scratch = dequantize_weight(self.base_layer)
        merged_before = list(self.merged)
        try:
            try:
                yield
            except BaseException:
                self.merged[:] = merged_before  # the base was not touched
                raise
            exact = self._scratch
            requantize(self.base_layer, exact)
            self.requantization_error = probe_error(exact, dequantize_weight(self.base_layer))
            warnings.warn(
                f"{what} into a {self.quant_mode} base re-quantises W + ΔW: the output of this "
                f"[{self.out_features}×{self.in_features}] layer on a random probe batch differs by up to "
                f"{self.requantization_error:.3g} from the exact merge; merge_and_unload(dequantize=True) "
                "keeps it exact", stacklevel=2)
        finally:
            self._scratch = None


def probe_error(exact: Tensor, approx: Tensor) -> float:
    probe = torch.randn(PROBE_ROWS, exact.shape[1], generator=torch.Generator().manual_seed(0))
    probe = probe.to(exact.device)
    return float((probe @ (exact - approx.to(exact.device)).T).abs().max())


# Asked before the plain linear kind: a bitsandbytes layer is an nn.Linear subclass.
QUANTIZED = LayerKind("quantized_linear", is_quantized_linear, QuantLoraLinear, linear=True, priority=10)
