"""What ``lorafit inspect`` shows: an adapter directory described without loading any model."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from typing import Any

from ..atomic import PathLike
from .fingerprints import describe
from .keys import split_lora_key, strip_prefix
from .peft_config import config_from_peft
from .reading import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, leftover_temp_files, read_adapter_dir


def describe_adapter(path: PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """A plain-data description of the adapter in `path` with the outcome of each format check.

    Problems that make the adapter unloadable (unreadable or corrupt files, bad JSON, unsupported
    keys) raise `AdapterFileError`; findings that only a model could settle, or that look wrong
    without being fatal, are listed under ``checks`` as ``(ok, text)``.
    """
    adapter = read_adapter_dir(path, allow_pickle=allow_pickle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, extras = config_from_peft(adapter.config, where=str(adapter.config_file))
    checks: list[tuple[bool, str]] = [(True, f"{CONFIG_NAME} is a LoRA config lorafit supports")]
    checks += [(False, str(w.message)) for w in caught]
    checksum = "checksum matches" if "lorafit.tensors_sha256" in adapter.metadata else "no checksum recorded"
    checks.append((True, f"{adapter.weights_file.name} readable, every tensor finite, {checksum}"))
    checks += [(True, note) for note in adapter.notes]

    factors: dict[str, dict[str, Any]] = {}
    other = 0
    for key, tensor in adapter.tensors.items():
        split = split_lora_key(key)
        if split is None:
            other += tensor.numel()
            continue
        factors.setdefault(split[0], {})[split[1]] = tensor
    ranks: Counter = Counter()
    bad_ranks = []
    for module, tensors in sorted(factors.items()):
        a = tensors.get("lora_A.weight", tensors.get("lora_embedding_A"))
        b = tensors.get("lora_B.weight", tensors.get("lora_embedding_B"))
        if a is None or b is None:
            checks.append((False, f"{module}: has {'B' if a is None else 'A'} but no {'A' if a is None else 'B'}"))
            continue
        ranks[a.shape[0]] += 1
        if a.shape[0] != b.shape[1] or a.shape[0] != config.rank_for(module):
            bad_ranks.append(f"{module} (A rank {a.shape[0]}, B rank {b.shape[1]}, config {config.rank_for(module)})")
    if bad_ranks:
        checks.append((False, f"ranks disagree with the config: {'; '.join(bad_ranks)}"))
    elif factors:
        checks.append((True, "every module's A and B have the rank the config gives it"))
    else:
        checks.append((False, "no LoRA tensors"))
    leftovers = leftover_temp_files(adapter.path)
    if leftovers:
        checks.append((False, f"temporary files from an interrupted save: {', '.join(leftovers)}"))
    if adapter.weights_file.name == PICKLE_NAME:
        checks.append((False, f"weights are a pickle ({PICKLE_NAME}); convert them to {WEIGHTS_NAME}"))

    lora_params = sum(t.numel() for tensors in factors.values() for t in tensors.values())
    files = {p.name: p.stat().st_size for p in sorted(adapter.path.iterdir())
             if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)}
    return {
        "path": str(adapter.path),
        "saved_by": f"lorafit {adapter.lorafit_version}" if adapter.lorafit_version else
        (f"PEFT {extras['peft_version']}" if extras.get("peft_version") else "unknown"),
        "base_model": config.base_model_name_or_path,
        "fingerprint": adapter.fingerprint,
        "task_type": config.task_type,
        "config": config.to_dict(),
        "scaling": config.scaling_for(""),
        "modules": sorted(factors),
        "module_counts": dict(Counter(m.rsplit(".", 1)[-1] for m in factors)),
        "ranks": dict(sorted(ranks.items())),
        "other_tensors": sorted(strip_prefix(k) for k in adapter.tensors if split_lora_key(k) is None),
        "parameters": {"total": lora_params + other, "lora": lora_params, "other": other},
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values()}),
        "files": files,
        "metadata": adapter.user_metadata,
        "extra_config_keys": sorted(extras),
        "subfolder_adapters": sorted(p.name for p in adapter.path.iterdir() if (p / CONFIG_NAME).is_file()),
        "checks": checks,
        "ok": all(ok for ok, _ in checks),
    }

def format_report(report: dict[str, Any]) -> str:
    """The text ``lorafit inspect`` prints for a `describe_adapter` report: one labelled line per
    fact, then each check marked ``ok`` or ``FAIL``."""
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


def _size(size: float) -> str:
    """`size` bytes in decimal units: ``512 B``, ``1.5 kB``, ``2.3 MB``, ``1.2 GB``."""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
