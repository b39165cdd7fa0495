"""What ``lorafit inspect`` shows: an adapter directory described without loading any model."""

from __future__ import annotations

import itertools
import json
import warnings
from collections import Counter
from typing import Any, Optional

import torch

from ..atomic import PathLike
from ..combine import METADATA_KEY as COMBINED_KEY
from ..config import LoraConfig
from ..errors import ConfigError
from ..kinds.parameter import layer_path, parameter_rank, pattern_key
from ..registry import find_init, selected_variant
from ..surgery import has_suffix
from .fingerprints import describe
from .keys import split_lora_key, strip_prefix
from .peft_config import config_from_peft
from .reading import (CONFIG_NAME, META_CHECKSUM, PICKLE_NAME, WEIGHTS_NAME, AdapterDir, leftover_temp_files,
                      lora_factors, read_adapter_dir, shape_problems)


def describe_adapter(path: PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """A plain-data description of the adapter in `path` with the outcome of each format check.

    Problems that make the adapter unreadable (unreadable or corrupt files, bad JSON, unsupported
    keys, integer or non-finite LoRA tensors) raise `AdapterFileError`; findings that look wrong,
    including factor shapes that do not fit the config's ranks or the recorded base weights, are
    listed under ``checks`` as ``(ok, text)``. ``combined`` is how `lorafit combine` made the
    adapter (its saved metadata), or None; ``parameter_targets`` gives each target_parameters
    layer's parameter, rank and expert count; ``variant`` is the config field of the variant of
    the adapter maths it selects (``use_dora``, ``lora_bias``, ...), or None for plain LoRA.
    """
    adapter = read_adapter_dir(path, allow_pickle=allow_pickle)
    config, extras, checks = _config_checks(adapter)
    variant = selected_variant(config)
    factors = lora_factors(adapter.tensors)
    parameters = _parameter_targets(config, factors)
    checks += _shape_checks(adapter, config, factors, parameters)
    tying, tying_checks = _tying(adapter, config, factors)
    checks += tying_checks
    checks += _file_checks(adapter)
    lora_params = sum(t.numel() for key, t in adapter.tensors.items() if split_lora_key(key) is not None)
    other = sum(t.numel() for key, t in adapter.tensors.items() if split_lora_key(key) is None)
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
        "variant": variant.field if variant else None,
        "modules": sorted(factors),
        "module_counts": dict(Counter(parameters[m]["parameter"].rsplit(".", 1)[-1] if m in parameters
                                      else m.rsplit(".", 1)[-1] for m in factors)),
        "ranks": dict(sorted(Counter(parameters[m]["rank"] if m in parameters else pair["A"][1].shape[0]
                                     for m, pair in factors.items() if "A" in pair).items())),
        "parameter_targets": parameters,
        "other_tensors": sorted(strip_prefix(k) for k in adapter.tensors if split_lora_key(k) is None),
        "parameters": {"total": lora_params + other, "lora": lora_params, "other": other},
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values()}),
        "files": files,
        "metadata": adapter.user_metadata,
        "combined": adapter.user_metadata.get(COMBINED_KEY),
        "initialised": _initialisation(config, extras),
        "tying": tying,
        "extra_config_keys": sorted(extras),
        "subfolder_adapters": sorted(p.name for p in adapter.path.iterdir() if (p / CONFIG_NAME).is_file()),
        "checks": checks,
        "ok": all(ok for ok, _ in checks),
    }


def _config_checks(adapter: AdapterDir) -> tuple[LoraConfig, dict[str, Any], list[tuple[bool, str]]]:
    """The config, its extra keys, and checks for the config and the weights file as read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, extras = config_from_peft(adapter.config, where=str(adapter.config_file))
    checks: list[tuple[bool, str]] = [(True, f"{CONFIG_NAME} is a LoRA config lorafit supports")]
    checks += [(False, str(w.message)) for w in caught]
    checksum = "checksum matches" if META_CHECKSUM in adapter.metadata else "no checksum recorded"
    checks.append((True, f"{adapter.weights_file.name} readable, every tensor finite, LoRA tensors floating "
                         f"point, {checksum}"))
    checks += [(True, note) for note in adapter.notes]
    return config, extras, checks


def _shape_checks(adapter: AdapterDir, config: LoraConfig, factors: dict[str, dict[str, tuple[str, Any]]],
                  parameters: dict[str, dict[str, Any]]) -> list[tuple[bool, str]]:
    """Missing partners, and factor shapes against the config's ranks (r·E rows on a
    target_parameters layer, `_parameter_targets`) and the recorded base weights. A wrong shape
    under a matching checksum was saved that way (the checksum would have caught a later change)."""
    if not factors:
        return [(False, "no LoRA tensors")]
    checks = [(False, f"{module}: has {next(iter(pair))} but no {'B' if 'A' in pair else 'A'}")
              for module, pair in sorted(factors.items()) if len(pair) != 2]
    origin = ("the file was saved this way: its checksum matches" if META_CHECKSUM in adapter.metadata
              else "no checksum recorded")

    def rank_for(module: str) -> int:
        target = parameters.get(module)
        return target["rank"] * target["experts"] if target else config.rank_for(module)

    def rank_why(module: str) -> Optional[str]:
        target = parameters.get(module)
        return (f"rank {target['rank']} of {target['parameter']} from {CONFIG_NAME}, {target['experts']} experts"
                if target else None)

    problems = shape_problems(adapter, rank_for, rank_why)
    checks += [(False, f"{problem}; {origin}") for problem in problems]
    if not problems:
        sizes = ("and the base weight shapes recorded in the fingerprint" if (adapter.fingerprint or {}).get("weights")
                 else "(in/out sizes unchecked: no base fingerprint recorded)")
        checks.append((True, f"every LoRA factor has the rank the config gives its module, {sizes}"))
    return checks


def _parameter_targets(config: LoraConfig, factors: dict[str, dict[str, tuple[str, Any]]]
                       ) -> dict[str, dict[str, Any]]:
    """Each target_parameters layer of the file: ``{"parameter": "path.name", "rank": r,
    "experts": E}``, its A [r·E, in] and B [out, r·E] (`lorafit.kinds.parameter`).

    Without the model two things are read from the factors, as the choice that most of the
    file's parameter layers fit (the smaller E on a tie): E (transformers' MoE blocks all have
    the same), and, for modules with several targeted parameters, the order the module registers
    them in (the first one's layer is innermost; one order per set of names, as a module class
    has one). A layer that fits no choice is checked against the best one, so it is named."""
    entries = [entry.rpartition(".") for entry in config.target_parameters or []]
    modules: dict[str, tuple[str, ...]] = {}  # module path -> its targeted parameters' names
    for layer in factors:
        owner = layer
        while owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
        names = tuple(dict.fromkeys(name for prefix, _, name in entries if has_suffix(owner, [prefix])))
        if names:
            modules[owner] = names

    def rows(layer: str) -> set[int]:  # r·E as A and B give it
        pair = factors.get(layer, {})
        return {t.shape[0] if k == "A" else t.shape[1] for k, (_, t) in pair.items() if t.dim() > 1}

    def targets(owner: str, order: tuple[str, ...]) -> dict[str, tuple[str, int]]:  # layer -> (parameter, r)
        return {layer_path(owner, i, len(order)): (pattern_key(owner, name), parameter_rank(config, owner, name))
                for i, name in enumerate(order) if layer_path(owner, i, len(order)) in factors}

    def fits(owners: list[str], order: tuple[str, ...], experts: int) -> int:
        return sum(rows(layer) == {r * experts} for owner in owners for layer, (_, r) in targets(owner, order).items())

    kinds = {names: [owner for owner in modules if modules[owner] == names] for names in set(modules.values())}
    counts = {n // r for names, owners in kinds.items() for owner in owners for order in itertools.permutations(names)
              for layer, (_, r) in targets(owner, order).items() for n in rows(layer) if n % r == 0 and n >= r}

    def best_order(names: tuple[str, ...], experts: int) -> tuple[str, ...]:
        return max(itertools.permutations(names), key=lambda order: fits(kinds[names], order, experts))

    experts = max(sorted(counts) or [1], key=lambda e: sum(fits(owners, best_order(names, e), e)
                                                           for names, owners in kinds.items()))
    found = {}
    for names, owners in kinds.items():
        order = best_order(names, experts)
        for owner in owners:
            found.update({layer: {"parameter": key, "rank": r, "experts": experts}
                          for layer, (key, r) in targets(owner, order).items()})
    return dict(sorted(found.items()))


def _tying(adapter: AdapterDir, config: LoraConfig, factors: dict[str, dict[str, tuple[str, Any]]]
           ) -> tuple[list[str], list[tuple[bool, str]]]:
    """With ``ensure_weight_tying``: the tied pairs the file holds, as ``"head = embedding (...)"``,
    and a check per pair. A tied head's LoRA factors are the transposes of the embedding's
    (``A_h = B_eᵀ``, ``B_h = A_eᵀ``); a tied head's modules_to_save copy equals the embedding's."""
    if not config.ensure_weight_tying:
        return [], []
    pairs, checks = [], []
    embeddings = {m: f for m, f in factors.items() if len(f) == 2 and f["A"][0].endswith("lora_embedding_A")}
    for emb, (a_e, b_e) in ((m, (f["A"][1], f["B"][1])) for m, f in embeddings.items()):
        for head, f in sorted(factors.items()):
            if head in embeddings or len(f) != 2 or f["A"][1].shape != b_e.T.shape or f["B"][1].shape != a_e.T.shape:
                continue
            same = torch.equal(f["A"][1], b_e.T) and torch.equal(f["B"][1], a_e.T)
            pairs.append(f"{head} = {emb} (LoRA factors transposed)")
            checks.append((same, f"{head}: LoRA factors {'are' if same else 'are NOT'} the transposes of {emb}'s "
                                 "(ensure_weight_tying)"))
    copies = {strip_prefix(k): t for k, t in adapter.tensors.items() if split_lora_key(k) is None}
    saved = [k for k in copies if has_suffix(k.rpartition(".")[0], config.modules_to_save or [])]
    for key in saved:
        for other, tensor in sorted(copies.items()):
            if other not in saved and other.rpartition(".")[2] == key.rpartition(".")[2] \
                    and tensor.shape == copies[key].shape and torch.equal(tensor, copies[key]):
                pairs.append(f"{other.rpartition('.')[0]} = {key.rpartition('.')[0]} (modules_to_save copy shared)")
    return pairs, checks


def _tying_text(pairs: list[str]) -> str:
    return "yes: " + "; ".join(pairs) if pairs else "yes (no tied pair in the file)"


def _file_checks(adapter: AdapterDir) -> list[tuple[bool, str]]:
    checks = []
    leftovers = leftover_temp_files(adapter.path)
    if leftovers:
        checks.append((False, f"temporary files from an interrupted save: {', '.join(leftovers)}"))
    if adapter.weights_file.name == PICKLE_NAME:
        checks.append((False, f"weights are a pickle ({PICKLE_NAME}); convert them to {WEIGHTS_NAME}"))
    return checks


def format_report(report: dict[str, Any]) -> str:
    """The text ``lorafit inspect`` prints for a `describe_adapter` report: one labelled line per
    fact, then each check marked ``ok`` or ``FAIL``."""
    config = report["config"]
    params = report["parameters"]
    rows = [
        ("adapter", f"{report['path']} (PEFT LoRA, saved by {report['saved_by']})"),
        ("base model", f"{report['base_model'] or '(not recorded)'}; fingerprint: {describe(report['fingerprint'])}"),
        ("combined", _combined_text(report["combined"])),
        ("initialised", _init_text(report["initialised"])),
        ("task type", config["task_type"] or "(none)"),
        ("r", f"{config['r']}   lora_alpha {config['lora_alpha']}   scaling {report['scaling']:g}   "
              f"rslora {_yes(config['use_rslora'])}   variant {report['variant'] or 'none'}   bias {config['bias']}"),
        ("rank_pattern", config["rank_pattern"] or None),
        ("alpha_pattern", config["alpha_pattern"] or None),
        ("target_modules", config["target_modules"]),
        ("targets", f"{len(report['modules'])} modules: " + ", ".join(
            f"{name} x{count}" for name, count in report["module_counts"].items())),
        ("ranks", ", ".join(f"r={r} on {n} modules" for r, n in report["ranks"].items()) or "(none)"),
        ("modules_to_save", config["modules_to_save"]),
        ("target_parameters", config["target_parameters"]),
        ("trainable_token_indices", config["trainable_token_indices"]),
        ("layer_replication", config["layer_replication"]),
        ("ensure_weight_tying", _tying_text(report["tying"]) if config["ensure_weight_tying"] else None),
        ("parameters", f"{params['total']:,} ({params['lora']:,} in LoRA factors, {params['other']:,} in "
                       f"modules_to_save/biases/embeddings)"),
        ("dtype", ", ".join(report["dtypes"])),
        ("files", "; ".join(f"{name} {_size(size)}" for name, size in report["files"].items())),
        ("metadata", json.dumps(report["metadata"]) if report["metadata"] else None),
        ("other adapters", ", ".join(report["subfolder_adapters"]) or None),
    ]
    rows = [(label, value) for label, value in rows if value is not None]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append("checks")
    lines += [f"  {'ok  ' if ok else 'FAIL'}  {text}" for ok, text in report["checks"]]
    return "\n".join(lines)


def _initialisation(config: LoraConfig, extras: dict[str, Any]) -> dict[str, Any]:
    """``init_lora_weights`` as saved, its settings field (``eva_config``...) and whether the
    scheme rewrote the base weights (then the adapter fits that rewritten base only)."""
    value = extras.get("init_lora_weights", config.init_lora_weights)
    try:
        scheme = find_init(value)
    except ConfigError:
        return {"scheme": value, "settings": None, "rewrites_base": None}
    return {"scheme": value, "settings": getattr(config, scheme.settings) if scheme.settings else None,
            "rewrites_base": scheme.rewrites_base}


def _init_text(init: dict[str, Any]) -> str:
    settings = f" ({json.dumps(init['settings'])})" if init["settings"] else ""
    base = {True: "; it rewrote the base weights, so the adapter fits that rewritten base",
            None: " (a scheme lorafit does not know)"}.get(init["rewrites_base"], "")
    return f"init_lora_weights {json.dumps(init['scheme'])}{settings}{base}"


def _combined_text(combined: Any) -> Optional[str]:
    """``ties of 0.7·a + -1.3·b (density 0.5, majority_sign_method total)`` from the metadata
    `lorafit.combine.CombineReport.as_metadata` saved; None when the adapter was not combined."""
    if not isinstance(combined, dict):
        return None
    weights = combined.get("weights")
    terms = " + ".join(f"{w}·{name}" for name, w in weights.items()) if isinstance(weights, dict) else "?"
    settings = ", ".join(f"{key} {value if isinstance(value, (str, int, float)) else json.dumps(value)}"
                         for key, value in combined.items() if key not in ("method", "weights"))
    return f"{combined.get('method')} of {terms}" + (f" ({settings})" if settings else "")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _size(size: float) -> str:
    """`size` bytes in decimal units: ``512 B``, ``1.5 kB``, ``2.3 MB``, ``1.2 GB``."""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
