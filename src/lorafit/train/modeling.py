"""Base models and tokenizers from a `ModelConfig`, wrapped with LoRA for training or inference."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from ..adapter_files import inference_dtype, label_config, read_adapter_dir, trained_base
from ..atomic import staged_directory
from ..dtypes import DTYPES, torch_dtype
from ..errors import ConfigError
from ..hardware import auto_dtype
from ..inits import prepare
from ..layers import LoraLayer
from ..model import LoraModel, load, wrap
from ..quant import quantize_like, quantize_model
from ..surgery import replace_module
from .config import ModelConfig, RunConfig

# Adapter metadata of a run whose init rewrote the base: the init_lora_weights value. The adapter
# is then plain LoRA over that rewritten base, which its base_model_name_or_path names (RUN_DIR/base).
REWRITTEN_BASE = "base_rewritten_by"

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The base dtype for the config value `name` on `device`, and why: ``auto`` is bf16 where the
    hardware multiplies bf16 natively (`lorafit.hardware.auto_dtype`), fp32 elsewhere."""
    if name == "auto":
        return auto_dtype(device)
    return torch_dtype(name), f"{name}: set in the config"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return choose_dtype(name, device)[0]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, cfg)


def load_base(cfg: ModelConfig, task: str, labels: Optional[Sequence[str]], dtype: torch.dtype,
              pad_token_id: Optional[int] = None) -> nn.Module:
    """The Hugging Face model for `task`: a causal LM, or a sequence classifier with one output
    per label (its head is freshly initialised)."""
    import transformers

    if task == "classification":
        model = _from_pretrained(transformers.AutoModelForSequenceClassification, cfg, dtype=dtype,
                                 **label_config(labels))
        if model.config.pad_token_id is None:  # decoder classifiers find the last token by it
            model.config.pad_token_id = pad_token_id
    else:
        model = _from_pretrained(transformers.AutoModelForCausalLM, cfg, dtype=dtype)
    if cfg.quantize != "none":
        quantize_model(model, cfg.quantize, compute_dtype=dtype, skip=head_modules(model))
    return model


def head_modules(model: nn.Module) -> list[str]:
    """The task head of a Hugging Face model: its top-level children with parameters other than
    the backbone (``classifier`` for BERT, ``score`` for Llama, ``pre_classifier`` and
    ``classifier`` for DistilBERT)."""
    backbone = getattr(model, "base_model_prefix", None)
    return [name for name, child in model.named_children()
            if name != backbone and any(True for _ in child.parameters())]


def build_model(cfg: RunConfig, labels: Optional[Sequence[str]], device: torch.device,
                pad_token_id: Optional[int] = None, init_batches: Optional[Iterable[Any]] = None) -> LoraModel:
    """The base model of `cfg`, wrapped with ``cfg.lora`` and ready to train on `device`.

    A classifier's head goes to ``modules_to_save`` unless the config names those modules.
    Trainable parameters are fp32 whatever the base dtype (see `ModelConfig.dtype`).
    Initialisations computed from data (``init_lora_weights`` eva, corda, lora_ga) run on
    `init_batches` (model inputs with labels; read only by those schemes) before wrapping
    (`lorafit.inits.prepare`).
    """
    dtype = resolve_dtype(cfg.model.dtype, device)
    base = load_base(cfg.model, cfg.task, labels, dtype, pad_token_id)
    lora = cfg.lora
    if cfg.task == "classification" and lora.modules_to_save is None:
        lora = lora.replace(modules_to_save=head_modules(base))
    if cfg.model.gradient_checkpointing == "mlp":
        checkpoint_mlps(base)
    elif cfg.model.gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()  # the frozen embeddings would otherwise cut the graph
        base.config.use_cache = False
    model = wrap(base, prepare(base.to(device), lora, init_batches)).to(device)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.train()
    return model


def save_base(model: LoraModel, path: Path, tokenizer: Any = None) -> None:
    """Write the base under `model`'s adapters (its LoRA layers' base layers, the originals of its
    modules_to_save) as a Hugging Face model directory at `path`, with `tokenizer` when given.
    `path` appears whole or not at all (built beside it, files fsync'ed, then renamed); the LoRA
    layers are taken out for the write and put back, so `model` is left as it was."""
    wrappers = list(model.wrappers())
    for name, wrapper in reversed(wrappers):  # inner first: nested layers (target_parameters)
        replace_module(model.model, name, wrapper.base_layer if isinstance(wrapper, LoraLayer)
                       else wrapper.original_module)
    try:
        with staged_directory(path) as staging:
            model.model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
    finally:
        for name, wrapper in wrappers:  # outer first, at the paths they had
            replace_module(model.model, name, wrapper)


def checkpoint_mlps(model: nn.Module) -> None:
    """Recompute the activations of each decoder block's ``mlp`` in the backward pass instead of
    keeping them; the blocks are the modules whose class the model lists in ``_no_split_modules``.

    Per token and layer a Llama-style MLP, ``down(silu(gate(x)) * up(x))``, keeps four tensors of
    the intermediate size I (gate, up, the activation, the product) against a handful of the
    hidden size H elsewhere in the block, with I about 2.7 H: recomputing it drops most of a
    step's activations for one more MLP forward per block. The recomputation replays the RNG
    and autocast state, so the gradients are those of a plain step.
    """
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    mlps = [block.mlp for block in model.modules()
            if type(block).__name__ in blocks and isinstance(getattr(block, "mlp", None), nn.Module)]
    if not mlps:
        raise ConfigError(f"model.gradient_checkpointing = 'mlp': {type(model).__name__} has no decoder blocks with an "
                          f"'mlp' module (blocks: {sorted(blocks) or 'none listed'}); use true")
    for mlp in mlps:
        mlp.forward = functools.partial(_recomputed, mlp.forward)


def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def read_labels(adapter_dir: Path) -> Optional[list[str]]:
    """A classifier's label names, saved in the adapter's metadata as ``{"labels": [...]}``."""
    return read_adapter_dir(adapter_dir).user_metadata.get("labels")


def load_trained(base: str, adapter_dir: Optional[Path], dtype: str = "auto"):
    """``(model, tokenizer, labels)`` for inference: `base` with the adapter in `adapter_dir`
    (none: the plain base model). Labels in the adapter's metadata make it a classifier. The
    base is loaded as the adapter was trained: in its recorded dtype unless `dtype` names one,
    and quantised the same way when it was trained on a quantised base."""
    adapter = read_adapter_dir(adapter_dir) if adapter_dir is not None else None
    trained = trained_base(adapter) if adapter is not None else None
    dtype = inference_dtype(dtype, [adapter] if adapter is not None else [])
    device = default_device()
    cfg = ModelConfig(name_or_path=base, dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    labels = adapter.user_metadata.get("labels") if adapter is not None else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_base(cfg, "classification" if labels else "causal_lm", labels, resolve_dtype(dtype, device), pad_id)
    if adapter is not None:
        quantize_like(model, trained.quantization)
        model = load(model, adapter_dir)
    return model.to(device).eval(), tokenizer, labels


def _from_pretrained(factory: Any, cfg: ModelConfig, **kwargs: Any) -> Any:
    if cfg.name_or_path is None:
        raise ConfigError("model.name_or_path is required: a local model directory or a hub id")
    try:
        return factory.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        hint = "" if Path(cfg.name_or_path).is_dir() else (
            " (not a local directory; offline, point model.name_or_path at a downloaded copy)")
        raise ConfigError(f"model.name_or_path = {cfg.name_or_path!r}: cannot load{hint}: {exc}") from None
