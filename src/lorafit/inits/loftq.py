"""LoftQ (Li et al. 2023, arXiv:2310.08659, Algorithm 1): a quantised base Q and factors whose
product cancels the quantisation error, ``Q + s·B A ≈ W``.

Alternate T = ``loftq_iter`` times, starting from ``L R = 0``:

    Q   = dequant(quant(W − L R))              nf4 (blocks of 64, fp32 absmax) or int8 (per row)
    U S Vᵀ = svd(W − Q)                        fp32, full SVD
    L = U_r √S_r  [out, r],   R = √S_r V_rᵀ  [r, in]

then ``B = L / √s``, ``A = R / √s`` (so ``s·B A = L R``) and the base weight becomes Q (in full
precision: ``dequant(Q)``). PEFT sets ``B = L``, ``A = R`` whatever the scale, which cancels the
error only when ``lora_alpha == r`` (s = 1); there both agree.

Shipping: the adapter belongs to the base Q, not to W. lorafit writes Q into the base weight as
PEFT does; save that base (``model.unload()`` then ``save_pretrained``) beside the adapter.
Quantising it again (``lorafit.quant.quantize_model``, nf4, blocks of 64, no double
quantisation) gives Q back bit for bit, because each block's largest weight dequantises to its
absmax exactly. Refused on an already quantised base (W is gone), non-linear layers, r > min(out, in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import LoraConfig
from ..errors import ConfigError
from ..registry import InitScheme
from .prepared import Preparation, Prepared, after_prepare, keep_all, out_in, take
from .svd_base import check_decomposable

NF4_BLOCKSIZE = 64


@dataclass
class LoftQConfig:
    """PEFT's LoftQConfig: ``loftq_bits`` 4 (nf4) or 8 (int8), ``loftq_iter`` alternations (>= 1)."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8):
            raise ConfigError(f"LoraConfig.loftq_config.loftq_bits = {self.loftq_bits!r} is invalid: expected 4 or 8")
        if self.loftq_iter < 1:
            raise ConfigError(f"LoraConfig.loftq_config.loftq_iter = {self.loftq_iter!r} is invalid: expected >= 1")


def quantization_roundtrip(weight: Tensor, bits: int) -> Tensor:
    """``dequant(quant(weight))`` in fp32 through bitsandbytes: nf4 with one fp32 absmax per 64
    weights (4 bits), or int8 with one absmax per row (8 bits)."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("init_lora_weights = 'loftq' needs bitsandbytes: pip install 'lorafit[quant]'") from None
    weight = weight.float().contiguous()
    if bits == 4:
        packed, state = bnbf.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                           quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).float()
    codes, row_scale, _ = bnbf.int8_vectorwise_quant(weight)
    return bnbf.int8_vectorwise_dequant(codes, row_scale).float()


def loftq_factors(weight: Tensor, r: int, scaling: float, bits: int, iterations: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(A [r, in], B [out, r], Q [out, in])`` for W [out, in] (see the module docstring)."""
    w = weight.float()
    low_rank = torch.zeros_like(w)
    for _ in range(iterations):
        q = quantization_roundtrip(w - low_rank, bits)
        U, S, Vh = torch.linalg.svd(w - q, full_matrices=False)
        root = S[:r].sqrt()  # [r]
        L, R = U[:, :r] * root, root[:, None] * Vh[:r]
        low_rank = L @ R
    return R / scaling ** 0.5, L / scaling ** 0.5, q


def prepare_loftq(preparation: Preparation) -> LoraConfig:
    settings, config = preparation.settings, preparation.config

    def factors(path, module):
        A, B, q = loftq_factors(out_in(module, module.weight.detach()), config.rank_for(path),
                                config.scaling_for(path), settings.loftq_bits, settings.loftq_iter)
        return Prepared(path, A, B, config.scaling_for(path), weight=q)

    return keep_all(preparation, factors)


LOFTQ = InitScheme("loftq", take, spelling="'loftq'", check_target=after_prepare(check_decomposable),
                   rewrites_base=True, settings="loftq_config", settings_type=LoftQConfig, prepare=prepare_loftq)
