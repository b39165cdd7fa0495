"""Training losses as summed values plus the number of targets they cover.

A trainer divides the sum by the targets of the whole accumulation window, so a step's loss is the
mean over every target token (or example) it saw, however they fall into micro-batches. Kept apart
from the trainer so that a memory-saving variant (chunked cross-entropy over hidden states) can
replace `causal_lm_loss` without touching the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..data import IGNORE_INDEX
from ..functional import linear_cross_entropy

# Model types whose logits are exactly ``lm_head(base_model(...).last_hidden_state)`` (no logit
# soft-capping or scaling), so the loss can be taken from hidden states without full logits.
HIDDEN_STATE_LOSS_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo2"})


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy (fp32).

    logits (B, T, V) at position t predict token t+1; labels (B, T) are aligned with the inputs
    (``labels[t] = input_ids[t]`` where the loss applies, `IGNORE_INDEX` elsewhere), so position t
    is scored against ``labels[t+1]``.
    """
    logits = logits[:, :-1].flatten(0, 1).float()  # (B·(T-1), V)
    targets = labels[:, 1:].flatten()  # (B·(T-1),)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def output_head(model: Any) -> Optional[tuple[nn.Module, nn.Linear]]:
    """(decoder, frozen lm_head) when `model`'s loss can be taken from its hidden states, else None."""
    hf = getattr(model, "model", model) if hasattr(model, "peft_config") else model
    config = getattr(hf, "config", None)
    if getattr(config, "model_type", None) not in HIDDEN_STATE_LOSS_MODELS:
        return None
    head = hf.get_output_embeddings()
    decoder = getattr(hf, "base_model", hf)
    if type(head) is not nn.Linear or decoder is hf or head.weight.requires_grad:
        return None
    return decoder, head


def causal_lm_loss_from_hidden(hidden: Tensor, head: nn.Linear, labels: Tensor) -> Tensor:
    """`causal_lm_loss` of ``head(hidden)`` without forming the logits: hidden (B, T, H) at position
    t is scored against ``labels[t+1]`` by a chunked cross-entropy (`linear_cross_entropy`)."""
    return linear_cross_entropy(hidden[:, :-1], head.weight, head.bias, labels[:, 1:])


def causal_lm_targets(labels: Tensor) -> int:
    """Tokens `causal_lm_loss` scores for these labels (the first position predicts nothing)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy (fp32) of logits (B, C) against class ids (B,)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def classification_targets(labels: Tensor) -> int:
    return labels.numel()


def correct_predictions(logits: Tensor, labels: Tensor) -> int:
    """How many rows of logits (B, C) put their maximum on the class in labels (B,)."""
    return int((logits.argmax(dim=-1) == labels).sum())


@dataclass(frozen=True)
class TaskLoss:
    """A task's summed loss and the count of targets it averages over."""

    loss: Callable[[Tensor, Tensor], Tensor]
    targets: Callable[[Tensor], int]


LOSSES = {
    "causal_lm": TaskLoss(causal_lm_loss, causal_lm_targets),
    "classification": TaskLoss(classification_loss, classification_targets),
}
