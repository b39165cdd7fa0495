"""The training loop of ``lorafit train``: `train` a `RunConfig`, or `resume` a stopped run.

One optimizer step runs ``grad_accum`` micro-batches of the epoch's `batch_plan` and divides the
summed loss by the targets of the whole window. Everything a step depends on (parameters,
optimizer, scheduler, RNG states, data position) is in each checkpoint, so a run resumed from
step N continues bit for bit (on CPU) as if it had never stopped.

Under torchrun every process runs this loop on its shard of each global batch (``batch_size x
grad_accum x processes`` examples per step), the target counts and gradients are summed across
processes (`distributed`), every process evaluates the whole eval split, and rank 0 alone writes
files while the others wait. A process's dropout stream is seeded with ``train.seed + rank``.

SIGINT or SIGTERM (torchrun passes them to every process) ends the run after the optimizer step
in progress: a checkpoint of that step is written and `TrainingInterrupted` raised. Under
``torchrun --max-restarts K``, `train` of a run directory that a failed attempt left behind
(``TORCHELASTIC_RESTART_COUNT`` > 0, same config) resumes it from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..atomic import atomic_write_json, is_temp_file
from ..data import DataReport, batch_plan, load_dataset_splits
from ..errors import ConfigError, TrainingError
from ..registry import find_init
from . import distributed
from .checkpoints import (CHECKPOINTS, TrainState, best_adapter_dir, latest_checkpoint, list_checkpoints,
                          load_checkpoint, prune_best_adapters, read_train_state, remove_partial, save_checkpoint,
                          torch_rng)
from .config import METRIC_GOALS, RunConfig, load_run_config, resolved, save_run_config
from .metrics import MetricsWriter, plot_losses, read_metrics, truncate_metrics
from .modeling import REWRITTEN_BASE, build_model, choose_dtype, default_device, dtype_name, load_tokenizer, save_base
from .objectives import objective_for, prepare_model
from .optim import build_optimizer, build_scheduler
from .progress import Progress

CONFIG_FILE = "config.yaml"
BASE_DIR = "base"  # the base an init rewrote (PiSSA, CorDA, LoftQ, ...), which the run's adapters fit
# What a run writes before its first checkpoint: a directory holding only these has nothing to resume.
UNSAVED_RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "tensorboard", CHECKPOINTS, BASE_DIR)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INIT_BATCHES = 16  # micro-batches of training data for initialisations computed from data


class TrainingInterrupted(TrainingError):
    """SIGINT or SIGTERM stopped the run after a complete step, whose checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg` from scratch in the directory ``cfg.output.dir``; return the summary.

    The directory must be new, empty, or left by a run that wrote no checkpoint; it is claimed
    (its config.yaml written) only once the data and the model have loaded, so a run that fails
    to start leaves nothing in the way of the next try. Under ``torchrun --max-restarts``, a
    restarted attempt finds the directory its predecessor left and resumes it (when the config
    is the same)."""
    with distributed.session(cfg.train) as group:
        return _new_run(cfg, group).run()  # the Trainer is gone before the session closes


def _new_run(cfg: RunConfig, group: distributed.Group) -> Trainer:
    """The `Trainer` of `train`, its run directory checked and, once it has loaded, claimed."""
    restarted = group.from_main(lambda: _check_run_dir(cfg))
    run_cfg = _saved_config(Path(cfg.output.dir)) if restarted else cfg
    trainer = Trainer(run_cfg, resume=restarted, group=group)
    if not restarted:  # the data and the model loaded: the directory is this run's now
        group.from_main(lambda: _claim_run_dir(cfg))
    return trainer


def resume(run_dir: Path | str) -> dict[str, Any]:
    """Continue the run in `run_dir` from its latest checkpoint (from the start when it has none),
    with as many processes as launched now."""
    cfg = _saved_config(Path(run_dir))
    with distributed.session(cfg.train) as group:
        return Trainer(cfg, resume=True, group=group).run()


def _saved_config(run_dir: Path) -> RunConfig:
    """The config a run directory holds, with ``output.dir`` set to that directory."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = load_run_config(run_dir / CONFIG_FILE)
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(run_dir)))


def _check_run_dir(cfg: RunConfig) -> bool:
    """(Rank 0, before anything loads.) Make ``cfg.output.dir`` ready for a new run: create it, or
    clear the records of a run that stopped before its first checkpoint; a directory with
    checkpoints, an adapter or other files is refused. True instead when it is an elastic
    restart's to resume (torchrun restarted the job and the directory holds the same run)."""
    run_dir = Path(cfg.output.dir)
    with _writing(run_dir):
        entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        if entries:
            saved = run_dir / CONFIG_FILE
            if elastic_restart() and saved.is_file() and load_run_config(saved) == resolved(cfg):
                print(f"elastic restart {elastic_restart()}: resuming {run_dir}")
                return True
            _clear_unsaved_run(run_dir, entries)
        run_dir.mkdir(parents=True, exist_ok=True)
    return False


def _clear_unsaved_run(run_dir: Path, entries: list[str]) -> None:
    """Delete `entries` of `run_dir` when they are only what a run writes before its first
    checkpoint (nothing to resume); otherwise refuse the directory."""
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        raise ConfigError(f"output.dir = {str(run_dir)!r} holds a run with checkpoints (the latest: step "
                          f"{checkpoints[-1][0]}): continue it with `lorafit train --resume {run_dir}`, or "
                          f"choose another output.dir")
    others = [name for name in entries if name not in UNSAVED_RUN_FILES and not is_temp_file(name)]
    if others:
        raise ConfigError(f"output.dir = {str(run_dir)!r} is not empty (it holds {', '.join(others[:4])}"
                          f"{', ...' if len(others) > 4 else ''}): choose another output.dir")
    print(f"{run_dir}: clearing {', '.join(entries)} of a run that stopped before its first checkpoint")
    for name in entries:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _claim_run_dir(cfg: RunConfig) -> None:
    """(Rank 0, once training can start.) Record the run's config in its directory."""
    run_dir = Path(cfg.output.dir)
    with _writing(run_dir):
        save_run_config(resolved(cfg), run_dir / CONFIG_FILE)


def elastic_restart() -> int:
    """How many times torchrun restarted this job (0 on its first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write under `path` (disk full, a file where a directory should be) into a
    `TrainingError` naming it."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or path
        raise TrainingError(f"cannot write {where}: {exc.strerror or exc}") from None


class Trainer:
    """One run: the model, data, optimizer and bookkeeping, and the loop over them."""

    def __init__(self, cfg: RunConfig, resume: bool, group: Optional[distributed.Group] = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output.dir)
        self.group = group or distributed.Group("none", default_device())
        self.rank, self.world_size, self.main = self.group.rank, self.group.world_size, self.group.main
        self.device = self.group.device
        self.dtype, self.dtype_reason = choose_dtype(cfg.model.dtype, self.device)
        self.task = cfg.task
        self.objective = objective_for(cfg)
        self.stop_signal: Optional[int] = None
        self.rewritten_base: Optional[tuple[Path, Any]] = None  # (RUN_DIR/base, the init that rewrote it)

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set, self.report = load_dataset_splits(cfg.data, tokenizer)
        self.lengths = self.train_set.lengths
        self.model = self._build_model(tokenizer)
        prepare_model(self.model, self.objective, cfg.train, (self.train_set, self.eval_set), self.device, self.dtype)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.group.active:
            self.group.broadcast(self.trainable)  # identical starting adapters, whatever the init
            torch.manual_seed(cfg.train.seed + self.rank)  # a dropout stream per process
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.batches_per_epoch = len(self._plan(0))  # the same in every epoch
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.train.grad_accum)
        self.state = TrainState(world_size=self.world_size)
        self.checkpoint: Optional[Path] = None
        if resume:
            self.checkpoint = self.group.from_main(self._resume_point)
            if self.checkpoint is not None:
                self.state = self._rescaled(read_train_state(self.checkpoint))
        self.total = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        if self.checkpoint is not None:
            self.state = self._rescaled(load_checkpoint(self.checkpoint, self.model, self.optimizer,
                                                        self.scheduler, self.scaler, self.rank))
        self.metrics = MetricsWriter(self.run_dir, cfg.output.tensorboard) if self.main else None
        self.started = time.perf_counter()
        self.first = self.last_log = (self.started, self.state.tokens)

    def _build_model(self, tokenizer: Any):
        """The LoRA-wrapped model on this process's device; under FSDP built on the CPU in the
        dtype it would have on the device, then sharded there. A base its init rewrote is saved
        before any sharding (`_keep_rewritten_base`)."""
        cfg = self.cfg
        # the first micro-batches of epoch 0 as one process would see them (so every process
        # computes the same factors and base), collated only if the init reads data (EVA, CorDA, LoRA-GA)
        first = batch_plan(self.lengths, cfg.train.batch_size, cfg.data.shuffle_seed, 0, 0, 1,
                           cfg.data.group_by_length)[:INIT_BATCHES]
        init_batches = (self.objective.collate([self.train_set[i] for i in ids], self.train_set.pad_id)
                        for ids in first)
        if self.group.mode != "fsdp":
            model = build_model(cfg, self.report.labels, self.device, self.train_set.pad_id, init_batches)
            self._keep_rewritten_base(model, tokenizer)
            return model
        on_cpu = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype_name(self.dtype)))
        model = build_model(on_cpu, self.report.labels, torch.device("cpu"), self.train_set.pad_id, init_batches)
        self._keep_rewritten_base(model, tokenizer)  # whole: every process holds all of it until shard
        distributed.shard(model, self.group)
        return model

    def _keep_rewritten_base(self, model, tokenizer: Any) -> None:
        """When the init rewrote the base (`InitScheme.rewrites_base`), rank 0 saves that base, with
        the tokenizer, to RUN_DIR/base, once (a resumed run finds it there), and the adapters the run
        saves are PEFT's shipping form: plain LoRA (``init_lora_weights: true``) over that base,
        which their ``base_model_name_or_path`` names, so they load on it with no warning."""
        config = model.peft_config["default"]
        scheme = find_init(config.init_lora_weights)
        if not scheme.rewrites_base:
            return
        path = self.run_dir.resolve() / BASE_DIR

        def write() -> None:
            if path.is_dir():
                return
            with _writing(path):
                for partial in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed write
                    shutil.rmtree(partial)
                save_base(model, path, tokenizer)

        self.group.from_main(write)
        settings = {scheme.settings: None} if scheme.settings else {}
        model.peft_config["default"] = config.replace(init_lora_weights=True, base_model_name_or_path=str(path),
                                                      **settings)
        self.rewritten_base = (path, config.init_lora_weights)

    def _total_steps(self) -> int:
        """``max_steps``, or the steps left to the end of the last epoch from `state` (at the
        current world size) plus those taken."""
        cfg, state = self.cfg.train, self.state
        if cfg.max_steps is not None:
            return cfg.max_steps
        if state.epoch >= cfg.epochs:
            return state.step
        this_epoch = math.ceil((self.batches_per_epoch - state.batch) / cfg.grad_accum)
        return state.step + this_epoch + (cfg.epochs - state.epoch - 1) * self.steps_per_epoch

    def _rescaled(self, state: TrainState) -> TrainState:
        """`state` with its data position moved to this run's number of processes."""
        batch = distributed.rescale_position(state.batch, state.world_size, self.world_size,
                                             self.cfg.train.batch_size, len(self.lengths))
        return dataclasses.replace(state, batch=batch, world_size=self.world_size)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, state = self.cfg.train, self.state
        self._announce()
        if cfg.eval_on_start and state.step == 0 and self.eval_set is not None:
            self._print(self._evaluate())
        progress = Progress(self.total, initial=state.step, stream=None if self.main else io.StringIO(),
                            log_every=cfg.log_every, elapsed_s=state.elapsed_s)
        with self._stop_signals():  # also around the error handling: a SIGTERM must not cut it short
            try:
                plan, plan_epoch = None, None
                while state.step < self.total and not self._early_stopped():
                    if plan_epoch != state.epoch:
                        plan, plan_epoch = self._plan(state.epoch), state.epoch
                    window = plan[state.batch:state.batch + cfg.grad_accum]
                    lr = self.scheduler.get_last_lr()[0]
                    done = self._step(window)
                    if done is None:
                        raise self._interrupted()
                    loss, grad_norm, tokens = done
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
                        line = self._evaluate()
                        if self.main:
                            progress.write(line)
                    if cfg.save_every and state.step % cfg.save_every == 0:
                        self._save()
                if state.pending_losses:  # early stop between two log steps
                    self._log(self.scheduler.get_last_lr()[0], None)
                if self.eval_set is not None and state.last_eval_step != state.step:
                    self._print(self._evaluate())
                return self._finish()
            except RuntimeError as exc:
                lost = self.group.lost(exc)  # a collective inside the model (FSDP) failed
                if lost is None:
                    raise
                raise self._stopped_by(lost) from None
            except distributed.PeerLost as exc:
                raise self._stopped_by(exc) from None
            finally:
                progress.close()

    def _plan(self, epoch: int) -> list[list[int]]:
        return batch_plan(self.lengths, self.cfg.train.batch_size, self.cfg.data.shuffle_seed, epoch,
                          self.rank, self.world_size, self.cfg.data.group_by_length)

    def _step(self, window: list[list[int]]) -> Optional[tuple[float, float, int]]:
        """One optimizer step over the micro-batches of `window`: ``(loss, grad norm, tokens)``,
        summed over the processes; None, with nothing done, when a process was asked to stop.

        One all-reduce before the forward passes gives every process the step's target and
        token counts (and whether to stop); one after them sums gradients and loss.
        """
        batches = [self.objective.collate([self.train_set[i] for i in ids], self.train_set.pad_id) if ids else None
                   for ids in window]
        counts = torch.tensor([*self.objective.window_targets(batches),
                               sum(self.lengths[i] for ids in window for i in ids),
                               self.stop_signal is not None], device=self.device)
        *targets, tokens, stop = self.group.sum(counts).tolist()
        if stop:
            return None
        total = torch.zeros(1 + len(self.objective.metric_names), device=self.device)  # loss, metric sums
        for batch in batches:
            if batch is None:  # an empty share of the epoch's last global batch
                if self.group.mode == "fsdp":
                    self._idle_pass()
                continue
            loss, sums = self.objective.loss(self.model, batch, targets, self.device, self.dtype)
            self.scaler.scale(loss).backward()
            total += torch.cat([loss.detach().float().reshape(1), sums.to(self.device)])
        total = distributed.sync_gradients(self.trainable, total, self.group)
        loss = total[0].item()
        for name, value in self.objective.metrics(total[1:], targets).items():
            self.state.pending_metrics.setdefault(name, []).append(value)
        if not math.isfinite(loss):
            raise self._diverged(f"the loss is {loss}")
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.max_grad_norm or math.inf)
        if not torch.isfinite(norm) and not self.scaler.is_enabled():  # fp16: the scaler skips the step
            raise self._diverged(f"the gradient norm is {norm.item()}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm.item(), tokens

    def _idle_pass(self) -> None:
        """A zero-weighted forward and backward, so this process joins the FSDP all-gathers of a
        micro-batch the others run while its own share is empty."""
        batch = self.objective.collate([self.train_set[0]], self.train_set.pad_id)
        loss = self.objective.loss(self.model, batch, self.objective.targets(batch), self.device, self.dtype)[0]
        self.scaler.scale(loss * 0.0).backward()

    def _diverged(self, what: str) -> TrainingError:
        state = self.state
        return TrainingError(
            f"training diverged at step {state.step + 1} (epoch {state.epoch}, batch {state.batch}): "
            f"{what}; {self._kept()}. Lower train.lr (now {self.cfg.train.lr:g}) or check the data, then "
            f"train again.")

    def _kept(self) -> str:
        return (f"the last good checkpoint is {self.checkpoint}" if self.checkpoint is not None
                else "no checkpoint was written before it (see train.save_every)")

    def _stopped_by(self, lost: distributed.PeerLost) -> TrainingError:
        return TrainingError(f"{lost}. It happened in step {self.state.step + 1}; {self._kept()}. Continue with "
                             f"`lorafit train --resume {self.run_dir}` (torchrun --max-restarts does it itself)")

    # -- interruption ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """Within the block, SIGINT and SIGTERM ask the loop to stop after the current step (a
        second SIGINT stops at once); handlers can only be set from the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask(signum: int, frame: Any) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = self.stop_signal or signum

        previous = {signum: signal.signal(signum, ask) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _interrupted(self) -> TrainingInterrupted:
        """Save the last complete step (unless just saved) and describe the stop."""
        state = self.state
        if state.step > 0 and (self.checkpoint is None or self.checkpoint.name != f"step-{state.step}"):
            self._save()
        signum = self.stop_signal or signal.SIGTERM  # another process may have got the signal
        saved = f"checkpoint {self.checkpoint}" if self.checkpoint is not None else "no step to save"
        return TrainingInterrupted(f"stopped by {signal.Signals(signum).name} after step {state.step} "
                                   f"({saved}); continue with `lorafit train --resume {self.run_dir}`", signum)

    # -- evaluation and early stopping -------------------------------------------------------------

    def _evaluate(self) -> str:
        """Evaluate (every process, on the whole eval split: FSDP needs all in each forward) and
        record rank 0's figures, which every process then acts on (early stopping)."""
        state, cfg = self.state, self.cfg.train
        metrics = self.group.share(self.objective.evaluate(self.model, self.eval_set, cfg.batch_size,
                                                           self.device, self.dtype))
        state.last_eval_step = state.step
        self._write({"step": state.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        if cfg.early_stopping_patience is not None and state.step > 0:
            value = metrics[cfg.early_stopping_metric]
            better = state.best is None or (value < state.best if METRIC_GOALS[cfg.early_stopping_metric] == "min"
                                            else value > state.best)
            if better:
                state.best, state.best_step, state.bad_evals = value, state.step, 0
                self._keep_best()
            else:
                state.bad_evals += 1
        return f"step {state.step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    def _keep_best(self) -> None:
        """Save this step's adapter, the best so far by the early-stopping metric, for the end of
        the run (rank 0, while the others wait); drop the older best ones that no checkpoint needs."""
        path = best_adapter_dir(self.run_dir, self.state.step)

        def write() -> None:
            with _writing(path):
                self._save_adapter(path)
            prune_best_adapters(self.run_dir, (self.state.step, self._checkpoint_best()))

        with distributed.whole_base_weights(self.model, self.group):
            self.group.from_main(write)

    def _checkpoint_best(self) -> Optional[int]:
        """The best step the latest checkpoint records (a resume from it needs that adapter)."""
        return read_train_state(self.checkpoint).best_step if self.checkpoint is not None else None

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
        record.update({name: sum(values) / len(values) for name, values in state.pending_metrics.items()})
        state.pending_metrics = {}
        record.update(tokens=state.tokens, tokens_per_s=round(self._tokens_per_s(self.last_log), 1),
                      elapsed_s=round(self._elapsed(), 3))
        state.pending_losses = []
        self.last_log = (time.perf_counter(), state.tokens)
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            with _writing(self.metrics.path):
                self.metrics.write(record)

    def _print(self, line: str) -> None:
        if self.main:
            print(line)

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
        metadata = {"labels": labels} if labels is not None else {}
        if self.rewritten_base is not None:
            metadata[REWRITTEN_BASE] = self.rewritten_base[1]
        self.model.save_adapter(path, adapter_names=["default"], metadata=metadata or None)

    def _save(self) -> None:
        """Write a checkpoint of the current step: every process hands rank 0 its RNG state
        (and, under FSDP, the targeted base weights) and waits while rank 0 writes."""
        state = dataclasses.replace(self.state, elapsed_s=self._elapsed())
        rng = self.group.gather(torch_rng())
        with distributed.whole_base_weights(self.model, self.group):
            self.checkpoint = self.group.from_main(lambda: save_checkpoint(
                self.run_dir, state, self.model, self.optimizer, self.scheduler, self.scaler,
                self.cfg.train.keep_last, self._save_adapter, rng))
        if self.main:  # a resume from this checkpoint needs only its best step's adapter
            prune_best_adapters(self.run_dir, (self.state.best_step,))

    def _resume_point(self) -> Optional[Path]:
        """(Rank 0) The checkpoint to resume from, after clearing what a killed run left half done."""
        remove_partial(self.run_dir)
        checkpoint = latest_checkpoint(self.run_dir)
        saved = read_train_state(checkpoint) if checkpoint is not None else TrainState()
        step = saved.step if checkpoint is not None else None
        prune_best_adapters(self.run_dir, (saved.best_step,))  # those of later steps were never reached
        print(f"resuming {self.run_dir} from "
              f"{f'step {step}' if checkpoint is not None else 'the start (no checkpoint yet)'}")
        with _writing(self.run_dir):
            truncate_metrics(self.run_dir / "metrics.jsonl", step if checkpoint is not None else -1)
        return checkpoint

    def _announce(self) -> None:
        if not self.main:
            return
        cfg = self.cfg.train
        trainable, total = self.model.get_nb_trainable_parameters()
        processes = (f" x {self.world_size} processes ({self.group.mode}) = global batch {self._global_batch()}"
                     if self.group.active else "")
        print(f"precision: base {self.dtype_reason}; adapters and loss fp32")
        print(self.report.summary())
        print(f"model: {self.cfg.model.name_or_path} ({self.task}, {dtype_name(self.dtype)} on {self.device}); "
              f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
        print(f"training: {self.total} steps ({self.steps_per_epoch} per epoch), batch {cfg.batch_size} x "
              f"{cfg.grad_accum} accumulation{processes}, lr {cfg.lr:g} {cfg.scheduler}; "
              f"run directory {self.run_dir}")
        if self.rewritten_base is not None:
            path, init = self.rewritten_base
            print(f"base: init_lora_weights = {init!r} rewrote it; saved to {path}, the base the adapters fit")

    def _global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world_size

    def _finish(self) -> dict[str, Any]:
        """Save the adapter and the run's records (rank 0, while the others wait); every process
        returns the summary."""
        with distributed.whole_base_weights(self.model, self.group):
            summary = self.group.from_main(self._write_results)
        self._print(format_summary(summary))
        return summary

    def _write_results(self) -> dict[str, Any]:
        """The run's adapter (under early stopping, that of the best evaluation), metrics and summary."""
        adapter, step = self.run_dir / "adapter", self.state.best_step
        if step is not None and best_adapter_dir(self.run_dir, step).is_dir():
            with _writing(adapter):
                best_adapter_dir(self.run_dir, step).rename(adapter)
        else:
            step = self.state.step
            self._save_adapter(adapter)
        prune_best_adapters(self.run_dir, ())
        self.metrics.close()
        records = read_metrics(self.run_dir / "metrics.jsonl")
        summary = {**self._summary(records, adapter), "adapter_step": step}
        with _writing(self.run_dir):
            atomic_write_json(self.run_dir / "summary.json", summary)
            if self.cfg.output.plot:
                plot_losses(records, self.run_dir / "loss.png")
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
            "dtype_reason": self.dtype_reason,
            "processes": self.world_size,
            "distributed": self.group.mode,
            "global_batch": self._global_batch(),
            "data": _data_facts(self.report),
        }
        if cfg.early_stopping_patience is not None:
            summary["best"] = {"metric": cfg.early_stopping_metric, "value": state.best,
                               "step": state.best_step}
        if self.rewritten_base is not None:
            path, init = self.rewritten_base
            summary["rewritten_base"] = {"path": str(path), "init_lora_weights": init}
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
        lines.append(f"  best eval {best['metric']} {best['value']} at step {best['step']}: the adapter is "
                     f"that step's")
    lines.append(f"  trainable {summary['trainable_params']:,} of {summary['total_params']:,} parameters; "
                 f"adapter {summary['adapter_bytes'] / 1024:.1f} KiB")
    if "rewritten_base" in summary:
        base = summary["rewritten_base"]
        lines.append(f"  base: {base['path']} (rewritten by init_lora_weights = {base['init_lora_weights']!r}); "
                     f"the adapter fits it only and names it as its base_model_name_or_path")
    data = summary["data"]
    lines.append(f"  data: {data['train_examples']} train / {data['eval_examples']} eval examples, "
                 f"{data['truncated']} truncated, {data['skipped_records']} records skipped")
    return "\n".join(lines)
