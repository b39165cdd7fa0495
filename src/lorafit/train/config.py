"""`RunConfig`: everything one training run needs, as typed sections.

``model`` (`ModelConfig`), ``lora`` (`lorafit.LoraConfig`), ``data`` (`lorafit.data.DataConfig`),
``train`` (`TrainConfig`) and ``output`` (`OutputConfig`). The same schema serves Python, YAML and
the command line: `load_run_config` reads a YAML file, applies ``section.key=value`` overrides and
builds the dataclasses through `lorafit.schema`, so an unknown key fails with the closest valid
name suggested and a value of the wrong type names its dotted field.

Relative paths in a config (data files, model directory, output directory) are relative to the
current directory; `resolved` makes them absolute before the config is saved with a run.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence, Union

from ..atomic import atomic_write_text
from ..config import LoraConfig
from ..data import DataConfig
from ..dtypes import dtype_choice
from ..errors import ConfigError
from ..registry import find_init
from ..schema import apply_overrides, from_dict, is_int, is_number, require, to_dict

TASKS = ("auto", "causal_lm", "classification")
QUANTIZE_MODES = ("none", "nf4", "fp4", "int8")
SCHEDULERS = ("cosine", "linear", "constant")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
OBJECTIVES = ("sft", "dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo")
# Eval metrics early stopping can watch, and whether larger is better.
METRIC_GOALS = {"loss": "min", "perplexity": "min", "accuracy": "max"}
TASK_METRICS = {"causal_lm": ("loss", "perplexity"), "classification": ("loss", "accuracy")}


@dataclass
class ModelConfig:
    """The base model: where it comes from, what head it gets, and how it is held in memory."""

    name_or_path: Optional[str] = None
    """A local Hugging Face model directory, or a hub id (downloaded only where the network and
    ``HF_HUB_OFFLINE`` allow). Required."""
    task: Literal["auto", "causal_lm", "classification"] = "auto"
    """``auto``: ``classification`` when ``data.format`` is ``classification``, else ``causal_lm``.
    Classification loads ``AutoModelForSequenceClassification`` with one output per data label."""
    dtype: str = "auto"
    """Weights of the frozen base; ``auto`` is bf16 on a CUDA device that supports it and on a CPU
    with bf16 matrix units (AMX-BF16 or AVX512-BF16, detected at run time), else fp32 (other CPUs
    emulate bf16, many times slower). Trainable parameters and the loss stay fp32 and
    half-precision forwards run under autocast; fp16 trains with loss scaling. ``fp32``, ``bf16``, ``fp16`` or torch's names
    (``float32``...; `lorafit.dtypes`), kept as the short name."""
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    """Quantize the frozen base weights (`lorafit.quant.quantize_model`)."""
    gradient_checkpointing: Union[bool, Literal["mlp"]] = False
    """Recompute activations in the backward pass instead of keeping them. ``true``: every
    decoder block's (least memory, about a third more compute); ``mlp``: only those of each
    block's MLP, the largest part (a Llama block keeps four tokens x intermediate tensors there),
    for one more MLP forward per block (`lorafit.train.modeling.checkpoint_mlps`)."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run (only for sources you trust)."""

    def __post_init__(self) -> None:
        require(self.name_or_path is None or (isinstance(self.name_or_path, str) and self.name_or_path),
                "model.name_or_path", self.name_or_path, "a model directory or hub id")
        require(self.task in TASKS, "model.task", self.task, f"one of {list(TASKS)}")
        self.dtype = dtype_choice(self.dtype, "model.dtype")
        require(self.quantize in QUANTIZE_MODES, "model.quantize", self.quantize, f"one of {list(QUANTIZE_MODES)}")


@dataclass
class TrainConfig:
    """The optimisation: how long, how fast, how often to evaluate and save."""

    epochs: int = 1
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: Optional[int] = None
    """Optimizer steps to take; the data is repeated (epoch after epoch) as often as needed."""
    batch_size: int = 8
    """Examples per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. The loss of a step is the sum over its micro-batches
    divided by the number of targets (tokens or examples) in all of them."""
    lr: float = 2e-4
    """Peak learning rate of the LoRA A factors (and every other trainable parameter)."""
    loraplus_lr_ratio: Optional[float] = None
    """LoRA+ (Hayou et al. 2024): the B factors train with ``lr * loraplus_lr_ratio``. Off when null."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`."""
    warmup_ratio: float = 0.0
    """Warmup as a share of all steps (used when `warmup_steps` is 0)."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning rate after warmup: cosine or linear decay to 0, or constant."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value; null turns clipping off."""
    seed: int = 0
    """Seeds the adapter initialisation and dropout (the data order follows ``data.shuffle_seed``)."""
    eval_every: Optional[int] = None
    """Evaluate every N steps (and always at the end, when there is eval data)."""
    eval_on_start: bool = False
    """Also evaluate before the first step (logged as step 0): the base model's figures."""
    save_every: Optional[int] = None
    """Write a resumable checkpoint every N steps."""
    keep_last: int = 2
    """Checkpoints kept on disk; older ones are deleted once a newer one is complete."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without improvement of `early_stopping_metric`; RUN_DIR/adapter is
    then the adapter of the best evaluation (its step is in summary.json), not of the last step."""
    early_stopping_metric: Literal["loss", "perplexity", "accuracy"] = "loss"
    """Eval metric watched by early stopping (loss and perplexity fall, accuracy rises)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps (loss averaged over those steps), and a progress line when
    the output is not a terminal."""
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """How the processes torchrun starts share a run: ``ddp`` (each holds the whole model),
    ``fsdp`` (the frozen base is sharded across them, so a larger model fits), ``auto`` (``ddp``)
    or ``none`` (more than one process is refused). Either way only the adapter trains, whole on
    every process, its gradients summed after each step (`lorafit.train.distributed`). Without
    torchrun every value trains one process."""
    dist_timeout_s: float = 60.0
    """Seconds a process waits for the others in a collective before the run fails (a dead or
    hung process stops the job within this time)."""
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    """``sft``: the next-token (or class) loss of ``data.format``. ``dpo`` and ``orpo``: preference
    tuning on ``data.format: preference`` pairs (formulas in `lorafit.train.preference`)."""
    beta: float = 0.1
    """DPO: β, the scale of the log-ratios against the reference (for ``ipo``, the regulariser τ).
    ORPO: λ, the weight of the odds-ratio term (TRL's ``beta``). 0.1 is TRL's default for both."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO loss type: ``sigmoid`` (the DPO paper's) or ``ipo`` (squared, each log-ratio divided by
    its answer's token count, as TRL 1.16 does)."""
    precompute_reference: bool = False
    """DPO: compute the reference log-probs of every pair once before training (one no-grad pass
    over the train and eval pairs) instead of a reference forward in every step."""
    init_adapter: Optional[str] = None
    """Start from the adapter in this directory (its own adapter_config.json replaces ``lora``).
    For DPO the reference is then that adapter, frozen, as TRL does with a trained PEFT model;
    without it the reference is the base model (the adapter disabled)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "keep_last", "log_every"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, f"train.{name}",
                    getattr(self, name), "an integer >= 1")
        for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            value = getattr(self, name)
            require(value is None or (is_int(value) and value >= 1), f"train.{name}", value,
                    "an integer >= 1, or null")
        require(is_int(self.warmup_steps) and self.warmup_steps >= 0, "train.warmup_steps",
                self.warmup_steps, "an integer >= 0")
        require(is_int(self.seed), "train.seed", self.seed, "an integer")
        require(is_number(self.lr) and self.lr > 0, "train.lr", self.lr, "a positive number")
        require(is_number(self.weight_decay) and self.weight_decay >= 0, "train.weight_decay",
                self.weight_decay, "a number >= 0")
        require(is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "train.warmup_ratio",
                self.warmup_ratio, "a number in [0, 1)")
        require(self.warmup_steps == 0 or self.warmup_ratio == 0, "train.warmup_ratio", self.warmup_ratio,
                "0 when warmup_steps is set (give one of the two)")
        require(self.max_grad_norm is None or (is_number(self.max_grad_norm) and self.max_grad_norm > 0),
                "train.max_grad_norm", self.max_grad_norm, "a positive number, or null")
        require(self.loraplus_lr_ratio is None or (is_number(self.loraplus_lr_ratio) and self.loraplus_lr_ratio > 0),
                "train.loraplus_lr_ratio", self.loraplus_lr_ratio, "a positive number, or null")
        require(self.scheduler in SCHEDULERS, "train.scheduler", self.scheduler, f"one of {list(SCHEDULERS)}")
        require(self.early_stopping_metric in METRIC_GOALS, "train.early_stopping_metric",
                self.early_stopping_metric, f"one of {list(METRIC_GOALS)}")
        require(self.distributed in DISTRIBUTED, "train.distributed", self.distributed,
                f"one of {list(DISTRIBUTED)}")
        require(is_number(self.dist_timeout_s) and self.dist_timeout_s > 0, "train.dist_timeout_s",
                self.dist_timeout_s, "a positive number of seconds")
        require(self.objective in OBJECTIVES, "train.objective", self.objective, f"one of {list(OBJECTIVES)}")
        require(is_number(self.beta) and self.beta > 0, "train.beta", self.beta, "a positive number")
        require(self.dpo_loss in DPO_LOSSES, "train.dpo_loss", self.dpo_loss, f"one of {list(DPO_LOSSES)}")
        require(not self.precompute_reference or self.objective == "dpo", "train.precompute_reference",
                self.precompute_reference, "false unless train.objective is 'dpo' (ORPO has no reference)")
        require(self.init_adapter is None or (isinstance(self.init_adapter, str) and self.init_adapter.strip() != ""),
                "train.init_adapter", self.init_adapter, "an adapter directory, or null")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` steps."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)


@dataclass
class OutputConfig:
    """Where a run writes, and which optional outputs it makes."""

    dir: str = "runs/run"
    """The run directory (RUN_DIR). It must be new or empty unless the run is resumed."""
    tensorboard: bool = False
    """Also write TensorBoard events to RUN_DIR/tensorboard (needs the tensorboard package)."""
    plot: bool = True
    """Draw train and eval loss curves to RUN_DIR/loss.png at the end (matplotlib)."""

    def __post_init__(self) -> None:
        require(isinstance(self.dir, str) and self.dir.strip() != "", "output.dir", self.dir, "a directory path")


@dataclass
class RunConfig:
    """A whole training run: ``model``, ``lora``, ``data``, ``train``, ``output``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.train.distributed == "fsdp" and self.model.quantize != "none":
            raise ConfigError(f"model.quantize = {self.model.quantize!r} cannot be combined with "
                              f"train.distributed = 'fsdp' (quantised weights do not shard); use 'ddp'")
        if self.model.quantize != "none" and find_init(self.lora.init_lora_weights).rewrites_base:
            raise ConfigError(f"lora.init_lora_weights = {self.lora.init_lora_weights!r} cannot be combined with "
                              f"model.quantize = {self.model.quantize!r}: the base is quantised before the adapter "
                              f"is made, and this initialisation computes the factors from the full-precision "
                              f"weights and rewrites them; set model.quantize: none (or another init_lora_weights)")
        if self.task == "classification" and self.data.format != "classification":
            raise ConfigError(f"model.task = 'classification' needs data.format = 'classification', "
                              f"got {self.data.format!r}")
        if self.task == "causal_lm" and self.data.format == "classification":
            raise ConfigError("data.format = 'classification' needs model.task = 'classification' (or 'auto')")
        preference = self.train.objective != "sft"
        if preference != (self.data.format == "preference"):
            raise ConfigError(f"train.objective = {self.train.objective!r} cannot train data.format = "
                              f"{self.data.format!r}: 'dpo' and 'orpo' need the 'preference' format, and it needs them")
        if preference and self.train.distributed == "fsdp":
            raise ConfigError(f"train.objective = {self.train.objective!r} is not supported with "
                              f"train.distributed = 'fsdp'; use 'ddp'")
        if self.train.early_stopping_patience is not None:
            metric = self.train.early_stopping_metric
            measured = ("loss",) if preference else TASK_METRICS[self.task]
            if metric not in measured:
                raise ConfigError(f"train.early_stopping_metric = {metric!r} is not measured for "
                                  f"{self.train.objective if preference else self.task}; expected one of {list(measured)}")
            has_eval = (self.data.eval_file or self.data.eval_split) is not None or self.data.eval_fraction > 0
            if not (has_eval and self.train.eval_every):
                raise ConfigError("train.early_stopping_patience needs evaluations: set train.eval_every and "
                                  "eval data (data.eval_file, data.eval_split or data.eval_fraction)")

    @property
    def task(self) -> str:
        """The task with ``auto`` decided by the data format."""
        if self.model.task != "auto":
            return self.model.task
        return "classification" if self.data.format == "classification" else "causal_lm"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def run_config(data: Optional[dict[str, Any]] = None, overrides: Iterable[str] = ()) -> RunConfig:
    """A `RunConfig` from plain data (a parsed YAML mapping) and ``key=value`` overrides."""
    return from_dict(RunConfig, apply_overrides(data or {}, overrides), "config")


def load_run_config(path: os.PathLike | str, overrides: Iterable[str] = ()) -> RunConfig:
    """Read the YAML file at `path`, apply `overrides`, and validate."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train, output)")
    try:
        return run_config(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_run_config(cfg: RunConfig, path: os.PathLike | str) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolved(cfg: RunConfig) -> RunConfig:
    """`cfg` as a run records it (a copy): ``task`` decided, local paths absolute, and
    ``lora.base_model_name_or_path`` (what adapter_config.json names) the model as the user gave
    it, so an adapter written after a resume names the base as one written by the first run."""
    def absolute(value: Optional[str]) -> Optional[str]:
        return str(Path(value).resolve()) if value is not None and Path(value).exists() else value

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, task=cfg.task, name_or_path=absolute(cfg.model.name_or_path)),
        lora=cfg.lora.replace(base_model_name_or_path=cfg.lora.base_model_name_or_path or cfg.model.name_or_path),
        data=dataclasses.replace(cfg.data, train_file=absolute(cfg.data.train_file),
                                 eval_file=absolute(cfg.data.eval_file)),
        train=dataclasses.replace(cfg.train, init_adapter=absolute(cfg.train.init_adapter)),
        output=dataclasses.replace(cfg.output, dir=str(Path(cfg.output.dir).resolve())),
    )


# -- reference for --help -------------------------------------------------------------------


def config_reference(cls: type = RunConfig, prefix: str = "", full: bool = True) -> list[tuple[str, str, str]]:
    """``(dotted key, default, meaning)`` for every leaf field of `cls`: the field's whole
    docstring on one line (its first sentence unless `full`), and for a field that takes one of
    fixed values (a ``Literal``), those values."""
    rows = []
    docs = field_docs(cls, full)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += config_reference(type(default), key + ".", full)
            continue
        doc = docs.get(f.name, "")
        if typing.get_origin(hints.get(f.name)) is typing.Literal:
            values = ", ".join(f"``{v}``" for v in typing.get_args(hints[f.name]))
            doc = f"{doc} One of {values}." if doc else f"One of {values}."
        rows.append((key, _show(default), doc))
    return rows


def format_reference(rows: Sequence[tuple[str, str, str]]) -> str:
    width = max(len(key) + len(default) for key, default, _ in rows) + 4
    return "\n".join(f"  {key}={default}".ljust(width + 3) + doc for key, default, doc in rows)


def field_docs(cls: type, full: bool = True) -> dict[str, str]:
    """Each field's attribute docstring (the string literal under the field) on one line, or its
    first sentence unless `full`."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            text = " ".join(after.value.value.split())
            docs[node.target.id] = text if full else re.split(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z`])", text)[0].rstrip(".") + "."
    return docs


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
