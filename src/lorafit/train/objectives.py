"""What a training step minimises: the supervised loss of the data format (``train.objective: sft``)
or a preference objective (``dpo``, ``orpo``: `lorafit.train.preference`).

An objective tells the trainer how to batch examples (``collate``), what the loss of a step
divides by (``window_targets``: counts summed over the accumulation window and the processes),
the loss of one micro-batch as its share of the step loss plus its metric sums (``loss``), the
step's logged figures (``metrics``) and how to evaluate (``evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..data import collate
from .config import RunConfig, TrainConfig
from .evaluation import evaluate, summed_loss
from .losses import LOSSES
from .preference import PreferenceObjective, add_reference_adapter, precompute_reference, preference_objective


@dataclass
class SupervisedObjective:
    """Next-token (causal LM) or class (classification) cross-entropy, averaged over every target
    of the step (see `lorafit.train.losses`)."""

    task: str
    metric_names: tuple[str, ...] = ()

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
        return collate(examples, pad_id)

    def targets(self, batch: dict[str, Tensor]) -> list[int]:
        return [LOSSES[self.task].targets(batch["labels"])]

    def window_targets(self, batches: Sequence[Optional[dict[str, Tensor]]]) -> list[int]:
        return [sum(self.targets(b)[0] for b in batches if b is not None)]

    def loss(self, model: Any, batch: dict[str, Tensor], totals: Sequence[int], device: torch.device,
             dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return summed_loss(model, batch, self.task, device, dtype)[0] / max(1, totals[0]), torch.zeros(0)

    def metrics(self, sums: Tensor, totals: Sequence[int]) -> dict[str, float]:
        return {}

    def evaluate(self, model: Any, dataset: Any, batch_size: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, float]:
        return evaluate(model, dataset, self.task, batch_size, device, dtype)


Objective = Union[SupervisedObjective, PreferenceObjective]


def objective_for(cfg: RunConfig) -> Objective:
    """The objective ``cfg.train.objective`` names."""
    if cfg.train.objective == "sft":
        return SupervisedObjective(cfg.task)
    return preference_objective(cfg.train)


def prepare_model(model: Any, objective: Objective, train: TrainConfig, datasets: Sequence[Any],
                  device: torch.device, dtype: torch.dtype) -> None:
    """Before the first step: start from ``train.init_adapter`` (loaded trainable, in fp32, as
    the ``default`` adapter), give DPO its frozen reference copy of it, and precompute the
    reference log-probs of `datasets` when ``train.precompute_reference`` asks for them (the
    copy is dropped then). Every process does the same, so all hold the same values."""
    if train.init_adapter is not None:
        model.load_adapter(train.init_adapter, "default", replace=True, trainable=True)
        model.set_adapter("default")
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if not isinstance(objective, PreferenceObjective):
        return
    if objective.reference_adapter is not None:
        add_reference_adapter(model, train.init_adapter)
    if train.precompute_reference:
        for dataset in datasets:
            if dataset is not None:
                precompute_reference(objective, model, dataset, train.batch_size, device, dtype)
        if objective.reference_adapter is not None:  # its log-probs are stored: free its weights
            model.delete_adapter(objective.reference_adapter)
