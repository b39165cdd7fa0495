"""An adapter merged into its base model, saved as a plain Hugging Face model directory
(``lorafit merge``): ``W' = W + scaling · B A`` for every adapted weight, computed in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..adapter_files import inference_dtype, label_config, read_adapter_dir
from ..atomic import staged_directory
from ..dtypes import dtype_choice, torch_dtype
from ..errors import AdapterFileError
from ..model import load
from ..quant import prepare_merge_base

# Hugging Face auto class per PEFT task_type, used when the adapter does not name the model class.
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def export_merged(base: str, adapter: str, out: str, dtype: str = "auto", strict: bool = False,
                  allow_pickle: bool = False) -> Path:
    """Load `base`, merge the adapter in `adapter` (in fp32, refusing NaN/Inf), and save a plain
    Hugging Face model directory at `out`, with the tokenizer of the adapter or the base if one
    loads. `out` appears whole or not at all: it is written beside and renamed into place.

    `dtype` is the saved weights' dtype (``fp32``/``bf16``/``fp16`` or torch's names); ``auto``
    is the dtype the adapter was trained with (recorded in its metadata), else the base config's. The model class is the one the adapter was saved on (lorafit
    fingerprint), else the one its ``task_type`` implies, else the base config's. Label names
    saved with the adapter (``metadata={"labels": [...]}``) become the merged config's
    ``id2label``. An adapter trained on a quantised base is merged into the base rounded through
    the same quantiser (`lorafit.quant.prepare_merge_base`), so the merged model computes what
    was trained.
    """
    dtype = inference_dtype(dtype_choice(dtype), [read_adapter_dir(adapter, allow_pickle=allow_pickle)])
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AdapterFileError(f"{target}: already exists and is not an empty directory; choose a new --out")
    adapted, base_config = load_adapted(base, adapter, strict=strict, allow_pickle=allow_pickle)
    merged = adapted.merge_and_unload(safe=True)
    merged.to(torch_dtype(dtype) if dtype != "auto" else _saved_dtype(base_config))
    with staged_directory(target) as staging:
        merged.save_pretrained(staging)
        tokenizer = find_tokenizer(adapter, base)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return target


def load_adapted(base: str, adapter: str, strict: bool = False, allow_pickle: bool = False):
    """(`base` loaded in fp32 with the adapter in `adapter` applied, the base's transformers
    config): the model class and label names as `export_merged` describes, and a quantised-base
    adapter's base rounded through its quantiser (`lorafit.quant.prepare_merge_base`)."""
    import transformers

    files = read_adapter_dir(adapter, allow_pickle=allow_pickle)
    try:
        base_config = transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"cannot read the base model config at {base!r}: {exc}") from None
    model_cls = model_class(transformers, files, base_config)
    kwargs = _label_kwargs(files.user_metadata.get("labels")) if "Classification" in model_cls.__name__ else {}
    model = model_cls.from_pretrained(base, dtype=torch.float32, **kwargs)
    prepare_merge_base(model, files.user_metadata.get("quantization"))
    return load(model, adapter, strict=strict, allow_pickle=allow_pickle), base_config


def model_class(transformers, files, base_config):
    """The transformers class to load the base of adapter `files` with: the class it was saved on
    (lorafit fingerprint), else the one its ``task_type`` implies, else the base config's."""
    names = [(files.fingerprint or {}).get("architecture"), TASK_CLASSES.get(files.config.get("task_type")),
             *(getattr(base_config, "architectures", None) or []), "AutoModel"]
    return next(getattr(transformers, name) for name in names if name and hasattr(transformers, name))


def _label_kwargs(labels: Any) -> dict[str, Any]:
    if not (isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels)):
        return {}
    return label_config(labels)


def _saved_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def find_tokenizer(*sources: str) -> Optional[Any]:
    """The first tokenizer that loads from `sources` (an adapter dir may carry an extended one)."""
    import transformers

    for source in sources:
        local = Path(source)
        if local.is_dir() and not any((local / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
            continue
        try:
            return transformers.AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    return None
