"""``lorafit inspect`` and ``lorafit merge``: look inside an adapter directory, or bake it into
a plain Hugging Face model directory.

    lorafit inspect out/                  # config, targets, ranks, parameter count, base model, checks
    lorafit merge --base BASE --adapter out/ --out merged/ [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Optional

from .errors import AdapterFileError

# Hugging Face auto class per PEFT task_type, used when the adapter does not name the model class.
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PICKLE_HELP = "read adapter_model.bin (pickle) with torch.load(weights_only=True); only for files you trust"


def register(subparsers) -> None:
    inspect = subparsers.add_parser("inspect", help="describe an adapter directory and check its format",
                                    description="Describe an adapter directory (config, targets, ranks, "
                                                "parameter count, file sizes, base model) and check its format.")
    inspect.add_argument("adapter", metavar="DIR", help="adapter directory (adapter_config.json + weights)")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    inspect.set_defaults(func=run_inspect)

    merge = subparsers.add_parser("merge", help="merge an adapter into its base model and save the result",
                                  description="Merge an adapter into its base model and save a plain Hugging "
                                              "Face model directory (tokenizer copied when there is one).")
    merge.add_argument("--base", required=True, help="base model directory or Hub id")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    merge.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not exist or be empty)")
    merge.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="dtype of the saved weights; auto keeps the base model's (the merge itself runs in fp32)")
    merge.add_argument("--strict", action="store_true", help="refuse a base model whose fingerprint differs")
    merge.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    merge.set_defaults(func=run_merge)


# -- inspect -----------------------------------------------------------------------------------


def run_inspect(args: argparse.Namespace) -> int:
    from .adapter_files.report import describe_adapter

    report = describe_adapter(args.adapter, allow_pickle=args.allow_pickle)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def format_report(report: dict[str, Any]) -> str:
    from .adapter_files.fingerprints import describe

    config = report["config"]
    params = report["parameters"]
    rows = [
        ("adapter", f"{report['path']} (PEFT LoRA, saved by {report['saved_by']})"),
        ("base model", f"{report['base_model'] or '(not recorded)'}; fingerprint: {describe(report['fingerprint'])}"),
        ("task type", config["task_type"] or "(none)"),
        ("r", f"{config['r']}   lora_alpha {config['lora_alpha']}   scaling {report['scaling']:g}   "
              f"rslora {_yes(config['use_rslora'])}   dora {_yes(config['use_dora'])}   bias {config['bias']}"),
        ("rank_pattern", config["rank_pattern"] or None),
        ("alpha_pattern", config["alpha_pattern"] or None),
        ("target_modules", config["target_modules"]),
        ("targets", f"{len(report['modules'])} modules: " + ", ".join(
            f"{name} x{count}" for name, count in report["module_counts"].items())),
        ("ranks", ", ".join(f"r={r} on {n} modules" for r, n in report["ranks"].items()) or "(none)"),
        ("modules_to_save", config["modules_to_save"]),
        ("parameters", f"{params['total']:,} ({params['lora']:,} in LoRA factors, {params['other']:,} in "
                       f"modules_to_save/biases/embeddings)"),
        ("dtype", ", ".join(report["dtypes"])),
        ("files", "; ".join(f"{name} {_size(size)}" for name, size in report["files"].items())),
        ("metadata", json.dumps(report["metadata"]) if report["metadata"] else None),
        ("other adapters", ", ".join(report["subfolder_adapters"]) or None),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows if value is not None]
    lines.append("checks")
    lines += [f"  {'ok  ' if ok else 'FAIL'}  {text}" for ok, text in report["checks"]]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# -- merge -------------------------------------------------------------------------------------


def run_merge(args: argparse.Namespace) -> int:
    out = export_merged(args.base, args.adapter, args.out, dtype=args.dtype, strict=args.strict,
                        allow_pickle=args.allow_pickle)
    print(f"merged model written to {out}")
    return 0


def export_merged(base: str, adapter: str, out: str, dtype: str = "auto", strict: bool = False,
                  allow_pickle: bool = False) -> Path:
    """Load `base`, merge the adapter in `adapter` (in fp32, refusing NaN/Inf), and save a plain
    Hugging Face model directory at `out`, with the tokenizer of the adapter or the base if one
    loads. `out` appears whole or not at all: it is written beside and renamed into place.

    The model class is the one the adapter was saved on (lorafit fingerprint), else the one its
    ``task_type`` implies, else the base config's. Label names saved with the adapter
    (``metadata={"labels": [...]}``) become the merged config's ``id2label``. An adapter trained
    on a quantised base is merged into the base rounded through the same quantiser
    (`lorafit.quant.prepare_merge_base`), so the merged model computes what was trained.
    """
    import torch
    import transformers

    from .adapter_files import load, read_adapter_dir
    from .quant import prepare_merge_base

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AdapterFileError(f"{target}: already exists and is not an empty directory; choose a new --out")
    files = read_adapter_dir(adapter, allow_pickle=allow_pickle)
    try:
        base_config = transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"cannot read the base model config at {base!r}: {exc}") from None
    model_cls = _model_class(transformers, files, base_config)
    kwargs = _label_kwargs(files.user_metadata.get("labels")) if "Classification" in model_cls.__name__ else {}
    model = model_cls.from_pretrained(base, dtype=torch.float32, **kwargs)
    prepare_merge_base(model, files.user_metadata.get("quantization"))
    merged = load(model, adapter, strict=strict, allow_pickle=allow_pickle).merge_and_unload(safe=True)
    merged.to(getattr(torch, DTYPES[dtype]) if dtype != "auto" else _saved_dtype(base_config))
    staging = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    try:
        merged.save_pretrained(staging)
        tokenizer = _tokenizer(transformers, adapter, base)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if target.exists():
            target.rmdir()
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _model_class(transformers, files, base_config):
    names = [(files.fingerprint or {}).get("architecture"), TASK_CLASSES.get(files.config.get("task_type")),
             *(getattr(base_config, "architectures", None) or []), "AutoModel"]
    return next(getattr(transformers, name) for name in names if name and hasattr(transformers, name))


def _label_kwargs(labels: Any) -> dict[str, Any]:
    if not (isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels)):
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def _saved_dtype(config):
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _tokenizer(transformers, *sources: str) -> Optional[Any]:
    """The first tokenizer that loads from `sources` (an adapter dir may carry an extended one)."""
    for source in sources:
        local = Path(source)
        if local.is_dir() and not any((local / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
            continue
        try:
            return transformers.AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    return None
