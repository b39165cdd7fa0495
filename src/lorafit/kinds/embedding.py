"""LoRA on `nn.Embedding`: ``E' = E + s · (B A)ᵀ`` with A [r, num], B [dim, r]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import LoraLayer, LoraWeights
from ..registry import LayerKind


class LoraEmbedding(LoraLayer):
    """Looks up rows of Aᵀ for the ids, then ``s · h Bᵀ``; dropout does not apply to ids."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def factor_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def weight_view(self) -> Tensor:
        return self.base_layer.weight.T

    def reset_factors(self, w: LoraWeights, value) -> None:
        """PEFT's embedding init: A zero and B normal (True/"gaussian"), so ΔE starts at zero
        while B gets gradients; False makes both random."""
        with torch.no_grad():
            if value is False:
                nn.init.normal_(w.A)
            else:
                nn.init.zeros_(w.A)
            nn.init.normal_(w.B)

    def lora_output(self, x: Tensor, w: LoraWeights) -> Tensor:
        base = self.base_layer
        h = F.embedding(x, w.A.T, base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)  # (..., r)
        return (h @ w.B.T) * w.scaling


EMBEDDING = LayerKind("embedding", lambda m: isinstance(m, nn.Embedding), LoraEmbedding,
                      factor_keys=("lora_embedding_A", "lora_embedding_B"))
