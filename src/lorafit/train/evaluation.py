"""Forward passes on collated batches, and the eval metrics: loss, perplexity, accuracy."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..data import collate, load_dataset_splits
from ..errors import ConfigError
from .losses import LOSSES, causal_lm_loss_from_hidden, correct_predictions, output_head
from .preference import add_reference_adapter, evaluate_pairs, preference_objective


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for a half-precision base (the fp32 trainable parameters meet half inputs)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def logits_of(model: Any, batch: dict[str, Tensor], task: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The model's logits for a `collate` batch (its labels are not passed: lorafit computes the loss)."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if task == "causal_lm":
        inputs["use_cache"] = False  # a cache would also stop packed rows from being kept apart
    with autocast(device, dtype):
        return model(**inputs).logits


def summed_loss(model: Any, batch: dict[str, Tensor], task: str, device: torch.device,
                dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """The summed loss of a `collate` batch, and the logits where they were formed.

    A causal LM whose logits are a plain frozen head over hidden states (`output_head`) never
    forms them: the loss comes from the hidden states through a chunked cross-entropy, which
    saves the (B, T, V) logits, their softmax and gradient in memory."""
    labels = batch["labels"].to(device)
    head = output_head(model) if task == "causal_lm" else None
    if head is None:
        logits = logits_of(model, batch, task, device, dtype)
        return LOSSES[task].loss(logits, labels), logits
    decoder, lm_head = head
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    with autocast(device, dtype):
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        return causal_lm_loss_from_hidden(hidden, lm_head, labels), None


@torch.no_grad()
def evaluate(model: Any, dataset: Any, task: str, batch_size: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, float]:
    """``loss`` (mean over all target tokens or examples) and ``perplexity`` (causal LM) or
    ``accuracy`` (classification) of `model` on a `TokenizedDataset`."""
    was_training = model.training
    model.eval()
    loss_fn = LOSSES[task]
    total, targets, correct = 0.0, 0, 0
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))  # less padding
    for start in range(0, len(order), batch_size):
        batch = collate([dataset[i] for i in order[start:start + batch_size]], dataset.pad_id)
        loss, logits = summed_loss(model, batch, task, device, dtype)
        total += loss.item()
        targets += loss_fn.targets(batch["labels"])
        if task == "classification":
            correct += correct_predictions(logits, batch["labels"].to(device))
    model.train(was_training)
    loss = total / max(targets, 1)
    if task == "classification":
        return {"loss": loss, "accuracy": correct / max(targets, 1)}
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


def evaluate_config(cfg: Any, adapter_dir: Optional[Path] = None) -> dict[str, Any]:
    """Metrics of the adapter in `adapter_dir` (or of the base model) on the eval split of `cfg`,
    a `RunConfig`, with the number of ``examples``. Without an adapter a classifier's new head is
    drawn from ``train.seed``, so the figures are those a run logs at step 0. A ``dpo`` or ``orpo``
    config gives its loss and TRL's reward figures (``rewards/accuracies``, ``rewards/margins``,
    ...) against the run's reference (the base, or ``train.init_adapter``). An adapter of a run
    whose init rewrote the base is evaluated on the base it names (RUN_DIR/base), not ``model``'s."""
    from .. import load
    from ..adapter_files import read_adapter_dir
    from .modeling import REWRITTEN_BASE, default_device, load_base, load_tokenizer, resolve_dtype

    device = default_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    _, eval_set, report = load_dataset_splits(cfg.data, tokenizer)
    if eval_set is None:
        raise ConfigError("the config has no eval split: set data.eval_file or data.eval_fraction")
    adapter = read_adapter_dir(adapter_dir) if adapter_dir is not None else None
    model_cfg = cfg.model
    if adapter is not None and REWRITTEN_BASE in adapter.user_metadata:
        base = adapter.config.get("base_model_name_or_path")
        if not (isinstance(base, str) and Path(base).is_dir()):
            raise ConfigError(f"{adapter_dir}: the adapter fits only the base its init rewrote "
                              f"({adapter.user_metadata[REWRITTEN_BASE]!r}), recorded as {base!r}, which is not a "
                              f"directory (was the run directory moved?)")
        model_cfg = dataclasses.replace(cfg.model, name_or_path=base)
    model = load_base(model_cfg, cfg.task, report.labels, dtype, eval_set.pad_id)
    if adapter is not None:
        saved = adapter.user_metadata.get("labels")
        if saved != report.labels:
            raise ConfigError(f"{adapter_dir}: the adapter was trained for labels {saved}, "
                              f"but the data has {report.labels}")
        model = load(model, adapter_dir)
    if cfg.train.objective == "sft":
        metrics = evaluate(model.to(device), eval_set, cfg.task, cfg.train.batch_size, device, dtype)
    else:
        objective = preference_objective(cfg.train)
        if adapter_dir is None and cfg.train.objective == "dpo":
            raise ConfigError("evaluating a dpo config needs an adapter (the base model is its own reference)")
        if objective.reference_adapter is not None:
            add_reference_adapter(model, cfg.train.init_adapter)
        metrics = evaluate_pairs(objective, model.to(device), eval_set, cfg.train.batch_size, device, dtype)
    return {**metrics, "examples": len(eval_set)}
