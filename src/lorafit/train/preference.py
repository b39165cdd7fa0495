"""Preference tuning: DPO (``sigmoid``, ``ipo``) and ORPO on (prompt x, chosen y_w, rejected y_l) pairs.

Log-probabilities. For an answer y of |y| tokens after its prompt x,
``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` (summed over the answer's tokens left after truncation);
π is the trained model (base + adapter), π_ref the reference. Chosen and rejected rows of a batch
of B pairs go through the model together: rows 0..B-1 are ``x + y_w``, rows B..2B-1 ``x + y_l``.

DPO (Rafailov et al. 2023, eq. 7), per pair, with the log-ratios ``r = log π(y|x) - log π_ref(y|x)``:

* ``sigmoid``: ``L = -log σ(β (r_w - r_l))``;
* ``ipo`` (Azar et al. 2023, eq. 17, with TRL's length normalisation): ``L = (r_w/|y_w| - r_l/|y_l| - 1/(2β))²``.

The reference is the base model (the adapter disabled: no second copy of the weights) or, when
training starts from an adapter, a frozen copy of that adapter; its log-probs come from a no-grad
forward in eval mode, on the fly or once before training (`precompute_reference`).

ORPO (Hong et al. 2024, eqs. 4-7), no reference: with the mean answer log-probability
``ℓ(y) = log π(y|x) / |y|`` and ``log odds(y) = ℓ(y) - log(1 - exp ℓ(y))``,
``L = NLL - β · mean_pairs log σ(log odds(y_w) - log odds(y_l))``, where NLL is the mean
next-token cross-entropy over every token of the chosen rows after the first (prompt included),
as TRL's ORPOTrainer computes it.

A step's loss is the mean over the pairs of its accumulation window (and processes); ORPO's NLL
is the mean over the window's chosen tokens. Logged (TRL's names): ``rewards/chosen`` and
``rewards/rejected`` (β r for DPO, β ℓ for ORPO, mean over pairs), ``rewards/accuracies`` (share
of pairs whose chosen reward is larger), ``rewards/margins`` (mean difference), ``logps/chosen``
and ``logps/rejected`` (log π for DPO, ℓ for ORPO), and for ORPO ``nll_loss``, ``log_odds_ratio``
(mean log σ term) and ``log_odds_chosen`` (mean log-odds difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import IGNORE_INDEX
from ..functional import linear_cross_entropy
from .losses import output_head

REFERENCE_ADAPTER = "ref"
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
ORPO_METRICS = DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")


# -- the losses, as pure functions of per-answer log-probabilities ----------------------------------


def dpo_losses(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
               beta: float, loss_type: str, chosen_lengths: Tensor, rejected_lengths: Tensor) -> Tensor:
    """Per-pair DPO losses (B,) from summed answer log-probs (B,) of policy and reference.

    ``sigmoid``: ``-log σ(β((π_w - ρ_w) - (π_l - ρ_l)))``; ``ipo``: ``((π_w - ρ_w)/|y_w| -
    (π_l - ρ_l)/|y_l| - 1/(2β))²`` with the answers' token counts (B,) as lengths."""
    chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen - rejected))
    if loss_type == "ipo":
        delta = chosen / chosen_lengths.clamp(min=1) - rejected / rejected_lengths.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r}; expected 'sigmoid' or 'ipo'")


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp x)`` for x < 0, accurate on both sides of ``-ln 2`` (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor) -> Tensor:
    """``log odds(y_w) - log odds(y_l)`` (B,) from mean answer log-probs ℓ (B,), in fp32, where
    ``log odds(y) = ℓ - log(1 - exp ℓ)``."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


# -- batches and forward passes ---------------------------------------------------------------------


def collate_pairs(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """A batch of B preference examples as 2B right-padded rows (chosen rows first), T = longest:

    * ``input_ids`` (2B, T): ``prompt + answer`` padded with `pad_id`; ``attention_mask`` (2B, T);
    * ``labels`` (2B, T): the answer's ids at its positions, `IGNORE_INDEX` elsewhere;
    * ``ref_logps`` (2B,): the precomputed reference log-probs, when the examples carry them.
    """
    if not examples:
        raise ValueError("collate_pairs: empty batch (the trainer must handle empty batches itself)")
    rows = [(e["prompt_ids"], e[key]) for key in ("chosen_ids", "rejected_ids") for e in examples]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    ids, labels, mask = [], [], []
    for prompt, answer in rows:
        pad = width - len(prompt) - len(answer)
        ids.append(prompt + answer + [pad_id] * pad)
        labels.append([IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * pad)
        mask.append([1] * (len(prompt) + len(answer)) + [0] * pad)
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref_logps"][i] for i in (0, 1) for e in examples])
    return batch


def answer_logps(model: Any, batch: dict[str, Tensor], device: torch.device, dtype: torch.dtype,
                 prompt_nll: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``log π(y|x)`` per row (2B,), fp32, and with `prompt_nll` the summed cross-entropy of the
    chosen rows' prompt tokens after the first (ORPO's NLL is that plus ``-Σ log π(y_w|x)``).

    Row r's position t predicts token t+1. A causal LM with a plain frozen head (`output_head`)
    never forms its (2B, T, V) logits: each row's answer positions go through the chunked
    cross-entropy of `linear_cross_entropy`."""
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    targets = batch["labels"][:, 1:].to(device)  # (2B, T-1)
    prompt = inputs["input_ids"][:, 1:].masked_fill((targets != IGNORE_INDEX) | (inputs["attention_mask"][:, 1:] == 0),
                                                     IGNORE_INDEX)  # (2B, T-1): prompt tokens only
    chosen_rows = targets.shape[0] // 2
    head = output_head(model)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if head is None:
            logprobs = torch.log_softmax(model(**inputs, use_cache=False).logits[:, :-1].float(), dim=-1)
            logps = _gathered(logprobs, targets).sum(dim=1)
            nll = -_gathered(logprobs[:chosen_rows], prompt[:chosen_rows]).sum() if prompt_nll else None
            return logps, nll
        decoder, lm_head = head
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (2B, T-1, H)
        logps = torch.stack([-linear_cross_entropy(hidden[r], lm_head.weight, lm_head.bias, targets[r])
                             for r in range(targets.shape[0])])
        nll = (linear_cross_entropy(hidden[:chosen_rows], lm_head.weight, lm_head.bias, prompt[:chosen_rows])
               if prompt_nll else None)
        return logps, nll


def _gathered(logprobs: Tensor, targets: Tensor) -> Tensor:
    """log-probs (N, T, V) at `targets` (N, T), 0 where the target is `IGNORE_INDEX`."""
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != IGNORE_INDEX)


# -- the objective the trainer runs ------------------------------------------------------------------


@dataclass
class PreferenceObjective:
    """DPO or ORPO for the trainer: how to batch pairs, what a step's loss divides by, the loss
    of one micro-batch, the metrics; see the module docstring for the formulas."""

    kind: str
    """``dpo`` or ``orpo``."""
    beta: float
    loss_type: str = "sigmoid"
    reference_adapter: Optional[str] = None
    """The adapter whose frozen weights give π_ref (None: the base model, the adapter disabled)."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ORPO_METRICS if self.kind == "orpo" else DPO_METRICS

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
        return collate_pairs(examples, pad_id)

    def targets(self, batch: dict[str, Tensor]) -> list[int]:
        """What a step's loss divides by: ``[pairs]``; ORPO also the chosen rows' NLL tokens."""
        pairs = batch["input_ids"].shape[0] // 2
        if self.kind == "dpo":
            return [pairs]
        return [pairs, int(batch["attention_mask"][:pairs, 1:].sum())]

    def window_targets(self, batches: Sequence[Optional[dict[str, Tensor]]]) -> list[int]:
        """`targets` summed over the micro-batches of a window (None: an empty share)."""
        counts = [self.targets(b) for b in batches if b is not None]
        return [sum(column) for column in zip(*counts)] if counts else [0] * (1 + (self.kind == "orpo"))

    @torch.no_grad()
    def reference_logps(self, model: Any, batch: dict[str, Tensor], device: torch.device,
                        dtype: torch.dtype) -> Tensor:
        """``log π_ref(y|x)`` per row (2B,): a no-grad forward in eval mode (no dropout) with the
        adapter disabled, or with the frozen `reference_adapter` active in its place."""
        if "ref_logps" in batch:
            return batch["ref_logps"].to(device)
        was_training = model.training
        model.eval()
        context = (model.disable_adapter() if self.reference_adapter is None
                   else model.using_adapter(self.reference_adapter))  # the policy's kernels, bit for bit
        try:
            with context:
                return answer_logps(model, batch, device, dtype)[0]
        finally:
            model.train(was_training)

    def loss(self, model: Any, batch: dict[str, Tensor], totals: Sequence[int], device: torch.device,
             dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """This micro-batch's share of the step loss (its summed terms over the window's `totals`)
        and its metric sums (one per `metric_names`, summed over pairs; detached)."""
        logps, nll = answer_logps(model, batch, device, dtype, prompt_nll=self.kind == "orpo")
        labels = batch["labels"].to(device)
        pairs = logps.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        if self.kind == "dpo":
            ref = self.reference_logps(model, batch, device, dtype)
            lengths = (labels != IGNORE_INDEX).sum(dim=1)
            losses = dpo_losses(chosen, rejected, ref[:pairs], ref[pairs:], self.beta, self.loss_type,
                                lengths[:pairs], lengths[pairs:])
            loss = losses.sum() / max(1, totals[0])
            rewards = self.beta * (logps.detach() - ref)
            shown, extra = logps.detach(), []
        else:
            scored = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            mean = logps / scored  # ℓ(y), (2B,)
            log_odds = orpo_log_odds(mean[:pairs], mean[pairs:])
            ratio = F.logsigmoid(log_odds)
            nll = nll - chosen.sum()  # every chosen token after the first
            loss = nll / max(1, totals[1]) - self.beta * ratio.sum() / max(1, totals[0])
            rewards = self.beta * mean.detach()
            shown, extra = mean.detach(), [nll.detach(), ratio.detach().sum(), log_odds.detach().sum()]
        margins = rewards[:pairs] - rewards[pairs:]
        sums = torch.stack([rewards[:pairs].sum(), rewards[pairs:].sum(), (margins > 0).float().sum(), margins.sum(),
                            shown[:pairs].sum(), shown[pairs:].sum(), *extra]).float()
        return loss, sums

    def evaluate(self, model: Any, dataset: Any, batch_size: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, float]:
        return evaluate_pairs(self, model, dataset, batch_size, device, dtype)

    def metrics(self, sums: Tensor, totals: Sequence[int]) -> dict[str, float]:
        """Means from metric sums (as `loss` returns them, added up): over the pairs of `totals`,
        and ORPO's ``nll_loss`` over its chosen tokens."""
        return {name: value / max(1, totals[1] if name == "nll_loss" else totals[0])
                for name, value in zip(self.metric_names, sums.tolist())}


def preference_objective(train: Any) -> PreferenceObjective:
    """The objective of a `TrainConfig` whose ``objective`` is ``dpo`` or ``orpo``."""
    reference = REFERENCE_ADAPTER if train.objective == "dpo" and train.init_adapter is not None else None
    return PreferenceObjective(train.objective, train.beta, train.dpo_loss, reference)


def add_reference_adapter(model: Any, path: str) -> None:
    """Load the adapter in `path` once more as `REFERENCE_ADAPTER`: inactive, so frozen."""
    model.load_adapter(path, REFERENCE_ADAPTER)


@torch.no_grad()
def precompute_reference(objective: PreferenceObjective, model: Any, dataset: Any, batch_size: int,
                         device: torch.device, dtype: torch.dtype) -> None:
    """Store ``ref_logps = (log π_ref(y_w|x), log π_ref(y_l|x))`` in every example of `dataset`
    (then `collate_pairs` carries them and no reference forward runs during training). Batches
    follow the dataset order, so the values are the same in every process and every resume."""
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        for example in examples:
            example.pop("ref_logps", None)
        ref = objective.reference_logps(model, collate_pairs(examples, dataset.pad_id), device, dtype).tolist()
        for i, example in enumerate(examples):
            example["ref_logps"] = (ref[i], ref[len(examples) + i])


@torch.no_grad()
def evaluate_pairs(objective: PreferenceObjective, model: Any, dataset: Any, batch_size: int,
                   device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """``loss`` and the metrics of `objective` over a preference `TokenizedDataset` (means over
    all its pairs; ORPO's NLL over all its chosen tokens): ``rewards/accuracies`` is the reward
    accuracy and ``rewards/margins`` the mean reward margin."""
    was_training = model.training
    model.eval()
    batches = [objective.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                 dataset.pad_id) for start in range(0, len(dataset), batch_size)]
    totals = objective.window_targets(batches)
    loss, sums = 0.0, torch.zeros(len(objective.metric_names))
    for batch in batches:
        part, metric_sums = objective.loss(model, batch, totals, device, dtype)
        loss += part.item()
        sums += metric_sums.cpu()
    model.train(was_training)
    return {"loss": loss, **objective.metrics(sums, totals)}
