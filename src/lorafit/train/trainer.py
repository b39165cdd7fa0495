"""The training loop of ``lorafit train``: `train` a `RunConfig`, or `resume` a stopped run.

One optimizer step runs ``grad_accum`` micro-batches of the epoch's `batch_plan` and divides the
summed loss by the targets of the whole window. Everything a step depends on (parameters,
optimizer, scheduler, RNG states, data position) is in each checkpoint, so a run resumed from
step N continues bit for bit (on CPU) as if it had never stopped.

Multi-process training is not written yet; the plumbing it needs is: `process_group` gives the
rank and world size, `batch_plan` shards the data by them, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import atomic_write_json
from ..data import DataReport, batch_plan, collate, load_dataset_splits
from ..errors import ConfigError, TrainingError
from .checkpoints import TrainState, latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from .config import METRIC_GOALS, RunConfig, TrainConfig, load_run_config, resolved, save_run_config
from .evaluation import evaluate, summed_loss
from .losses import LOSSES
from .metrics import MetricsWriter, plot_losses, read_metrics, truncate_metrics
from .modeling import build_model, default_device, dtype_name, load_tokenizer, resolve_dtype
from .optim import build_optimizer, build_scheduler
from .progress import Progress

CONFIG_FILE = "config.yaml"


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg` from scratch in the new (or empty) directory ``cfg.output.dir``; return the summary."""
    run_dir = Path(cfg.output.dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"output.dir = {str(run_dir)!r} is not empty: continue that run with "
                          f"`lorafit train --resume {run_dir}`, or choose another output.dir")
    return Trainer(cfg, resume=False).run()


def resume(run_dir: Path | str) -> dict[str, Any]:
    """Continue the run in `run_dir` from its latest checkpoint (from the start when it has none)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = load_run_config(run_dir / CONFIG_FILE)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(run_dir)))
    return Trainer(cfg, resume=True).run()


def process_group(cfg: TrainConfig) -> tuple[int, int]:
    """``(rank, world_size)`` of this process."""
    if cfg.distributed != "none":
        raise ConfigError(f"train.distributed = {cfg.distributed!r} is not available yet; use 'none'")
    return 0, 1


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


class Trainer:
    """One run: the model, data, optimizer and bookkeeping, and the loop over them."""

    def __init__(self, cfg: RunConfig, resume: bool):
        self.cfg = cfg
        self.run_dir = Path(cfg.output.dir)
        self.rank, self.world_size = process_group(cfg.train)
        self.main = self.rank == 0
        self.device = default_device()
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.task = cfg.task
        self.loss_fn = LOSSES[self.task]

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set, self.report = load_dataset_splits(cfg.data, tokenizer)
        self.lengths = self.train_set.lengths
        self.model = build_model(cfg, self.report.labels, self.device, self.train_set.pad_id)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.batches_per_epoch = len(self._plan(0))  # the same in every epoch
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.train.grad_accum)
        self.total = total_steps(cfg.train, self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.state = TrainState()
        self.checkpoint: Optional[Path] = None

        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_run_config(resolved(cfg), self.run_dir / CONFIG_FILE)
        if resume:
            self._restore()
        self.metrics = MetricsWriter(self.run_dir, cfg.output.tensorboard) if self.main else None
        self.started = time.perf_counter()
        self.first = self.last_log = (self.started, self.state.tokens)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, state = self.cfg.train, self.state
        self._announce()
        if cfg.eval_on_start and state.step == 0 and self.eval_set is not None:
            print(self._evaluate())
        progress = Progress(self.total, initial=state.step)
        try:
            plan, plan_epoch = None, None
            while state.step < self.total and not self._early_stopped():
                if plan_epoch != state.epoch:
                    plan, plan_epoch = self._plan(state.epoch), state.epoch
                window = plan[state.batch:state.batch + cfg.grad_accum]
                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm, tokens = self._step(window)
                state.step += 1
                state.batch += len(window)
                state.tokens += tokens
                state.pending_losses.append(loss)
                if state.batch >= self.batches_per_epoch:
                    state.epoch, state.batch = state.epoch + 1, 0
                if state.step % cfg.log_every == 0 or state.step == self.total:
                    self._log(lr, grad_norm)
                progress.update(state.step, loss, lr, self._tokens_per_s(self.first))
                if cfg.eval_every and state.step % cfg.eval_every == 0 and self.eval_set is not None:
                    progress.write(self._evaluate())
                if cfg.save_every and state.step % cfg.save_every == 0:
                    self._save()
        finally:
            progress.close()
        if state.pending_losses:  # early stop between two log steps
            self._log(self.scheduler.get_last_lr()[0], None)
        if self.eval_set is not None and state.last_eval_step != state.step:
            print(self._evaluate())
        return self._finish()

    def _plan(self, epoch: int) -> list[list[int]]:
        return batch_plan(self.lengths, self.cfg.train.batch_size, self.cfg.data.shuffle_seed, epoch,
                          self.rank, self.world_size, self.cfg.data.group_by_length)

    def _step(self, window: list[list[int]]) -> tuple[float, float, int]:
        """One optimizer step over the micro-batches of `window`: ``(loss, grad norm, tokens)``."""
        batches = [collate([self.train_set[i] for i in ids], self.train_set.pad_id) for ids in window if ids]
        targets = max(1, sum(self.loss_fn.targets(batch["labels"]) for batch in batches))
        total = 0.0
        for batch in batches:
            loss = summed_loss(self.model, batch, self.task, self.device, self.dtype)[0] / targets
            if not torch.isfinite(loss):
                raise self._diverged(f"the loss is {loss.item()}")
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.max_grad_norm or math.inf)
        if not torch.isfinite(norm) and not self.scaler.is_enabled():  # fp16: the scaler skips the step
            raise self._diverged(f"the gradient norm is {norm.item()}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm.item(), sum(self.lengths[i] for ids in window for i in ids)

    def _diverged(self, what: str) -> TrainingError:
        state = self.state
        kept = (f"the last good checkpoint is {self.checkpoint}" if self.checkpoint is not None
                else "no checkpoint was written before it (see train.save_every)")
        return TrainingError(
            f"training diverged at step {state.step + 1} (epoch {state.epoch}, batch {state.batch}): "
            f"{what}; {kept}. Lower train.lr (now {self.cfg.train.lr:g}) or check the data, then "
            f"train again.")

    # -- evaluation and early stopping -------------------------------------------------------------

    def _evaluate(self) -> str:
        state, cfg = self.state, self.cfg.train
        metrics = evaluate(self.model, self.eval_set, self.task, cfg.batch_size, self.device, self.dtype)
        state.last_eval_step = state.step
        self._write({"step": state.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        if cfg.early_stopping_patience is not None and state.step > 0:
            value = metrics[cfg.early_stopping_metric]
            better = state.best is None or (value < state.best if METRIC_GOALS[cfg.early_stopping_metric] == "min"
                                            else value > state.best)
            if better:
                state.best, state.best_step, state.bad_evals = value, state.step, 0
            else:
                state.bad_evals += 1
        return f"step {state.step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    def _early_stopped(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        return patience is not None and self.state.bad_evals >= patience

    # -- records -----------------------------------------------------------------------------------

    def _log(self, lr: float, grad_norm: Optional[float]) -> None:
        state = self.state
        record = {"step": state.step, "epoch": round(state.epoch + state.batch / self.batches_per_epoch, 4),
                  "loss": sum(state.pending_losses) / len(state.pending_losses), "lr": lr}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        record.update(tokens=state.tokens, tokens_per_s=round(self._tokens_per_s(self.last_log), 1),
                      elapsed_s=round(self._elapsed(), 3))
        state.pending_losses = []
        self.last_log = (time.perf_counter(), state.tokens)
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _elapsed(self) -> float:
        return self.state.elapsed_s + time.perf_counter() - self.started

    def _tokens_per_s(self, since: tuple[float, int]) -> float:
        """Input tokens per second from the moment and token count `since` until now."""
        since, tokens = since
        return (self.state.tokens - tokens) / max(time.perf_counter() - since, 1e-9)

    # -- files -------------------------------------------------------------------------------------

    def _save_adapter(self, path: Path) -> None:
        """The adapter files, with a classifier's labels (a quantised base's description is
        recorded by `save_adapter` itself)."""
        labels = self.report.labels
        self.model.save_adapter(path, metadata={"labels": labels} if labels is not None else None)

    def _save(self) -> None:
        if self.main:
            state = dataclasses.replace(self.state, elapsed_s=self._elapsed())
            self.checkpoint = save_checkpoint(self.run_dir, state, self.model, self.optimizer, self.scheduler,
                                              self.scaler, self.cfg.train.keep_last, self._save_adapter)

    def _restore(self) -> None:
        remove_partial(self.run_dir)
        self.checkpoint = latest_checkpoint(self.run_dir)
        if self.checkpoint is not None:
            self.state = load_checkpoint(self.checkpoint, self.model, self.optimizer, self.scheduler, self.scaler)
        print(f"resuming {self.run_dir} from "
              f"{f'step {self.state.step}' if self.checkpoint is not None else 'the start (no checkpoint yet)'}")
        if self.main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step if self.checkpoint is not None else -1)

    def _announce(self) -> None:
        cfg = self.cfg.train
        trainable, total = self.model.get_nb_trainable_parameters()
        print(self.report.summary())
        print(f"model: {self.cfg.model.name_or_path} ({self.task}, {dtype_name(self.dtype)} on {self.device}); "
              f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
        print(f"training: {self.total} steps ({self.steps_per_epoch} per epoch), batch {cfg.batch_size} x "
              f"{cfg.grad_accum} accumulation, lr {cfg.lr:g} {cfg.scheduler}; run directory {self.run_dir}")

    def _finish(self) -> dict[str, Any]:
        adapter = self.run_dir / "adapter"
        if self.main:
            self._save_adapter(adapter)
            self.metrics.close()
        records = read_metrics(self.run_dir / "metrics.jsonl")
        summary = self._summary(records, adapter)
        if self.main:
            atomic_write_json(self.run_dir / "summary.json", summary)
            if self.cfg.output.plot:
                plot_losses(records, self.run_dir / "loss.png")
        print(format_summary(summary))
        return summary

    def _summary(self, records: list[dict[str, Any]], adapter: Path) -> dict[str, Any]:
        """The facts of a finished run, as saved in summary.json."""
        state, cfg = self.state, self.cfg.train
        trainable, total = self.model.get_nb_trainable_parameters()
        last_train = next((r for r in reversed(records) if "loss" in r), {})
        last_eval = next((r for r in reversed(records) if any(k.startswith("eval_") for k in r)), None)
        summary = {
            "status": "early_stopped" if self._early_stopped() else "completed",
            "steps": state.step,
            "epochs": last_train.get("epoch"),
            "train_loss": last_train.get("loss"),
            "eval": {k[5:]: v for k, v in last_eval.items() if k != "step"} if last_eval else None,
            "trainable_params": trainable,
            "total_params": total,
            "adapter_bytes": sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()),
            "tokens_seen": state.tokens,
            "wall_time_s": round(self._elapsed(), 3),
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "data": _data_facts(self.report),
        }
        if cfg.early_stopping_patience is not None:
            summary["best"] = {"metric": cfg.early_stopping_metric, "value": state.best,
                               "step": state.best_step}
        return summary


def _data_facts(report: DataReport) -> dict[str, Any]:
    return {"train_examples": report.train_examples, "eval_examples": report.eval_examples,
            "truncated": report.truncated, "skipped_records": report.skipped, "labels": report.labels}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"done: {summary['status']} after {summary['steps']} steps ({summary['epochs']} epochs) "
             f"in {summary['wall_time_s']:.1f} s, {summary['tokens_seen']:,} tokens"]
    if summary["train_loss"] is not None:
        lines.append(f"  train loss {summary['train_loss']:.4f}")
    if summary["eval"]:
        lines.append("  eval " + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
    if "best" in summary:
        best = summary["best"]
        lines.append(f"  best eval {best['metric']} {best['value']} at step {best['step']}")
    lines.append(f"  trainable {summary['trainable_params']:,} of {summary['total_params']:,} parameters; "
                 f"adapter {summary['adapter_bytes'] / 1024:.1f} KiB")
    data = summary["data"]
    lines.append(f"  data: {data['train_examples']} train / {data['eval_examples']} eval examples, "
                 f"{data['truncated']} truncated, {data['skipped_records']} records skipped")
    return "\n".join(lines)
