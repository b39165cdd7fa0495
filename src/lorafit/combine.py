"""Combining adapters into a new one: ``ΔW_new ≈ Σ_i w_i ΔW_i`` per layer.

Each adapter i on a layer contributes ``ΔW_i = s_i B_i A_i`` (A [r_i, in(, *kernel)], B [out, r_i
(, 1, 1)]); write ``c_i = w_i s_i``. The methods are those of PEFT's ``add_weighted_adapter``:

- ``cat`` (exact): stack the factors, ``A = [A_1; …; A_n]`` [Σr_i, in] and
  ``B = [c_1 B_1, …, c_n B_n]`` [out, Σr_i], scaling 1, so ``B A = Σ c_i B_i A_i``.
  Works for any mix of ranks, alphas, rsLoRA and per-module rank/alpha patterns.
- factor-wise rules (same-rank adapters on each module): a merge rule R of
  `lorafit.merge_methods` applied to the A and B factors separately,
  ``A = R([A_i], [sign(c_i) sqrt|c_i|])``, ``B = R([B_i], [sqrt|c_i|])``, scaling 1. With R =
  ``linear`` this is method ``linear``; the others are ``ties``, ``dare_linear``, ``dare_ties`` and
  ``magnitude_prune``. None of them is the weighted delta: the product has cross terms
  ``c_i c_j B_i A_j``. They keep the rank small and are what merging recipes built on PEFT
  expect; use ``cat`` or ``svd`` when the maths must hold.
- update-wise rules: ``ΔW = R([s_i B_i A_i], [w_i])`` [out, in·k], then its best rank-`rank`
  approximation (Eckart–Young) ``ΔW_k = U_k Σ_k V_kᵀ`` as ``B = U_k Σ_k``, ``A = V_kᵀ``.
  With R = ``linear`` this is ``svd`` (the exact weighted ΔW, truncated); the others are
  ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd`` and ``magnitude_prune_svd``. The report
  gives the truncation error ``‖ΔW − ΔW_k‖ / ‖ΔW‖ = sqrt(Σ_{j>k} σ_j²) / sqrt(Σ_j σ_j²)`` over
  every module together.

``density`` (the kept fraction, for the pruning rules) and ``majority_sign_method`` (``total``
or ``frequency``, for the TIES rules) are passed on to the rule. DARE's random masks are drawn
layer by layer in module order; on each layer for the adapters' A factors in the order of
`weights`, then for their B factors (or for their ΔW with the ``*_svd`` methods); from torch's
global generator, or from a generator seeded with `seed`. That is the order in which PEFT draws
them, so the same masks give PEFT's adapter (tests/test_combine.py replays PEFT's masks); the same
seed does not, as PEFT first draws the random initialisation of the adapter it creates. PEFT
draws the ΔW masks of embeddings and fan_in_fan_out layers over the transposed ΔW.
Unlike PEFT, which falls back to ``linear`` when given one adapter, lorafit applies the method
asked for.

Adapters whose maths is not ``s B A`` (DoRA's normalised magnitude) or that carry
modules_to_save copies cannot be combined exactly and are refused.

An output head tied to the input embedding by ``ensure_weight_tying`` (`lorafit.kinds.tying`)
stays tied: when every adapter that updates the embedding or the head ties the two, each
adapter's head update is its embedding update transposed, so the combination's is too; the new
adapter gets the embedding's combined factors, the head their transposes, and
``ensure_weight_tying``. When another adapter updates one of the two alone, the combination
would update them differently and could not be tied: refused, naming that adapter. (PEFT's
``add_weighted_adapter`` gives the combined adapter no head update at all.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .config import LoraConfig
from .errors import AdapterError
from .functional import delta_weight
from .kinds.tying import TiedLoraWeights
from .layers import LoraWeights
from .merge_methods import RULES


@dataclass(frozen=True)
class Part:
    """One adapter's factors on one module: A, B, its scaling s and its combination weight w."""

    A: Tensor
    B: Tensor
    scaling: float
    weight: float

    @property
    def coefficient(self) -> float:
        """``c = w s``."""
        return self.weight * self.scaling


@dataclass(frozen=True)
class Options:
    """The settings a method reads; `generator` is None for torch's global one."""

    rank: Optional[int] = None
    density: Optional[float] = None
    majority_sign_method: str = "total"
    generator: Optional[torch.Generator] = None

    @property
    def rule_args(self) -> tuple:
        """The trailing arguments of a `lorafit.merge_methods.Rule`."""
        return self.density, self.majority_sign_method, self.generator


# The key under which a combined adapter's file records how it was made (`lorafit inspect` shows it).
METADATA_KEY = "combined"


@dataclass
class CombineReport:
    """What `combine` did: method, its settings, ranks per module, and (``*svd``) the relative
    truncation error. Save it with the adapter, ``model.save_adapter(dir, metadata=report.as_metadata())``
    (``lorafit combine`` does), and ``lorafit inspect`` shows how the adapter was made."""

    method: str
    weights: dict[str, float] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    relative_error: float = 0.0
    discarded_energy: float = 0.0

    def as_metadata(self) -> dict[str, object]:
        """``{"combined": {"method", "weights", <settings>, "ranks": [min, max], "relative_error"?}}``."""
        ranks = sorted(set(self.ranks.values()))
        data = {"method": self.method, "weights": dict(self.weights), **self.settings,
                "ranks": [ranks[0], ranks[-1]] if ranks else []}
        if self.method.endswith("svd"):
            data["relative_error"] = self.relative_error
        return {METADATA_KEY: data}


# A method: (parts on one module, options) -> (A, B, discarded σ² sum, total σ² sum)
Factors = tuple[Tensor, Tensor, float, float]


def cat_factors(parts: Sequence[Part], options: Options) -> Factors:
    """Exact: (A, B) with ``B A = Σ c_i B_i A_i`` (used with scaling 1)."""
    A = torch.cat([p.A for p in parts], dim=0)
    B = torch.cat([p.B * p.coefficient for p in parts], dim=1)
    return A, B, 0.0, 0.0


def factorwise(rule: str, parts: Sequence[Part], options: Options) -> Factors:
    """``A = R([A_i], [sign(c_i) sqrt|c_i|])``, ``B = R([B_i], [sqrt|c_i|])`` for rule R, in the
    factors' dtype; every A_i must have one rank."""
    ranks = {p.A.shape[0] for p in parts}
    if len(ranks) != 1:
        raise AdapterError(f"method {rule!r} needs adapters of one rank on each module, got ranks {sorted(ranks)}")
    merge = RULES[rule].merge
    roots = [math.sqrt(abs(p.coefficient)) for p in parts]
    A = merge([p.A for p in parts], [math.copysign(r, p.coefficient) for r, p in zip(roots, parts)], *options.rule_args)
    B = merge([p.B for p in parts], roots, *options.rule_args)
    return A.to(parts[0].A.dtype), B.to(parts[0].B.dtype), 0.0, 0.0


def svd_of_merged(rule: str, parts: Sequence[Part], options: Options) -> Factors:
    """Rank-`options.rank` factors of ``ΔW = R([s_i B_i A_i], [w_i])``, zero-padded to that rank
    where ΔW has fewer singular values, plus (discarded σ² sum, total σ² sum)."""
    first = parts[0]
    merged = RULES[rule].merge([delta_of(p) for p in parts], [p.weight for p in parts], *options.rule_args)
    U, S, Vh = torch.linalg.svd(merged.reshape(merged.shape[0], -1).float(), full_matrices=False)
    rank = options.rank
    k = min(rank, S.shape[0])
    B = (U[:, :k] * S[:k]).reshape(first.B.shape[0], k, *first.B.shape[2:])
    A = Vh[:k].reshape(k, *first.A.shape[1:])
    if k < rank:  # pad to the requested rank so every module has the same r
        A = torch.cat([A, A.new_zeros(rank - k, *A.shape[1:])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k, *B.shape[2:])], dim=1)
    energy = S.double().pow(2)
    return A.to(first.A.dtype), B.to(first.B.dtype), float(energy[k:].sum()), float(energy.sum())


def delta_of(part: Part) -> Tensor:
    """``s B A`` in fp32, [out, in(, *kernel)]."""
    return delta_weight(part.A, part.B, part.scaling)


@dataclass(frozen=True)
class Method:
    """A combination method: how it builds a module's factors, the merge rule it applies (None
    for cat) and whether it truncates the merged ΔW by SVD (then it needs a rank)."""

    build: Callable[[Sequence[Part], Options], Factors]
    rule: Optional[str] = None
    svd: bool = False

    def settings(self, rank: Optional[int], density: Optional[float], majority_sign_method: str,
                 seed: Optional[int]) -> dict[str, object]:
        """The settings this method reads, as recorded in a `CombineReport`."""
        rule = RULES[self.rule] if self.rule else None
        chosen = {"rank": rank if self.svd else None, "density": density if rule and rule.prunes else None,
                  "majority_sign_method": majority_sign_method if rule and rule.elects_sign else None,
                  "seed": seed if rule and rule.random else None}
        return {key: value for key, value in chosen.items() if value is not None}


METHODS: dict[str, Method] = {
    "cat": Method(cat_factors),
    **{rule: Method(partial(factorwise, rule), rule) for rule in RULES},
    **{"svd" if rule == "linear" else f"{rule}_svd": Method(partial(svd_of_merged, rule), rule, svd=True)
       for rule in RULES},
}


def combine(model, weights: Mapping[str, float], name: str, method: str = "cat", rank: Optional[int] = None,
            density: Optional[float] = None, majority_sign_method: str = "total",
            seed: Optional[int] = None) -> CombineReport:
    """Add adapter `name` to `model` (a LoraModel) combining `weights` {adapter: w} by `method`
    (see the module docstring); `rank` for the ``*svd`` methods, `density` for the pruning ones,
    `seed` for DARE's masks (None: torch's global generator)."""
    chosen = _check(model, weights, name, method, rank, density, majority_sign_method)
    template = model.peft_config[next(iter(weights))]
    report = CombineReport(method, {a: float(w) for a, w in weights.items()},
                           chosen.settings(rank, density, majority_sign_method, seed))
    options = Options(rank, density, majority_sign_method)
    tied = _tied_heads(model, weights)
    new_weights: dict[str, LoraWeights] = {}
    total = 0.0
    for path, layer in model.lora_layers():
        parts = [] if path in tied else _parts(path, layer, weights)
        if not parts:
            continue
        if seed is not None and options.generator is None:  # on the adapters' device
            options = replace(options, generator=torch.Generator(parts[0].A.device).manual_seed(seed))
        A, B, lost, energy = chosen.build(parts, options)
        report.discarded_energy += lost
        total += energy
        new_weights[path] = LoraWeights(A.clone(), B.clone(), 1.0, template.lora_dropout)
        report.ranks[path] = A.shape[0]
    report.relative_error = math.sqrt(report.discarded_energy / total) if total > 0 else 0.0
    layers = dict(model.lora_layers())
    for head, embedding in tied.items():  # added after the embedding's, whose storage they share
        new_weights[head] = TiedLoraWeights(layers[embedding], new_weights[embedding], 1.0, template.lora_dropout)
    model.add_adapter_weights(name, _config_for(report.ranks, template, bool(tied)), new_weights)
    return report


def check_options(method: str, rank: Optional[int] = None, density: Optional[float] = None,
                  majority_sign_method: str = "total") -> Method:
    """The `Method` named `method`, once its settings are valid (`AdapterError` naming the one
    that is not); needs no model, so a command can refuse before loading one."""
    if method not in METHODS:
        raise AdapterError(f"combine: method {method!r} is unknown; expected one of {list(METHODS)}")
    chosen = METHODS[method]
    if chosen.svd and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise AdapterError(f"combine: method {method!r} needs a positive integer rank, got {rank!r}")
    if chosen.rule is not None:
        RULES[chosen.rule].check(method, density, majority_sign_method)
    return chosen


def _check(model, weights: Mapping[str, float], name: str, method: str, rank: Optional[int],
           density: Optional[float], majority_sign_method: str) -> Method:
    chosen = check_options(method, rank, density, majority_sign_method)
    if not weights:
        raise AdapterError("combine: no adapters given")
    for adapter in weights:
        if adapter not in model.peft_config:
            raise AdapterError(f"combine: unknown adapter {adapter!r}; this model has {model.adapter_names}")
        if model.peft_config[adapter].modules_to_save:
            raise AdapterError(f"combine: adapter {adapter!r} has modules_to_save copies, which have no exact combination")
    if name in model.peft_config:
        raise AdapterError(f"combine: an adapter named {name!r} already exists")
    return chosen


def _tied_heads(model, weights: Mapping[str, float]) -> dict[str, str]:
    """{head path: embedding path} for each output head that adapters of `weights` tie to the
    input embedding; `AdapterError` when another adapter of `weights` updates one of the two
    without the tie (see the module docstring)."""
    layers = dict(model.lora_layers())
    paths = {id(layer): path for path, layer in layers.items()}
    tied = {}
    for head, layer in layers.items():
        ties = [(a, w.source_layer) for a, w in layer.lora.items() if a in weights and isinstance(w, TiedLoraWeights)]
        if not ties:
            continue
        tying, source = ties[0]
        embedding = paths[id(source)]
        for adapter in weights:
            on_head, on_embedding = adapter in layer.lora, adapter in source.lora
            own = layer.lora[adapter] if on_head else None
            if isinstance(own, TiedLoraWeights) and own.source_layer is source:
                continue
            if on_head or on_embedding:
                where = f"has its own LoRA on {head!r}" if on_head else f"has LoRA on {embedding!r} alone"
                raise AdapterError(f"combine: adapter {tying!r} ties {head!r} to {embedding!r} (ensure_weight_tying) "
                                   f"but adapter {adapter!r} {where}: the combination would update the two "
                                   "differently, so it could not be tied; combine adapters that all tie them, or "
                                   "none that updates either")
        tied[head] = embedding
    return tied


def _parts(path: str, layer, weights: Mapping[str, float]) -> list[Part]:
    parts = []
    for adapter, w in weights.items():
        if adapter not in layer.lora:
            continue
        lw = layer.lora[adapter]
        if type(lw) is not LoraWeights:
            raise AdapterError(f"combine: adapter {adapter!r} on {path!r} is a {type(lw).__name__} "
                               "(e.g. DoRA), whose update is not s·B·A; it cannot be combined exactly")
        parts.append(Part(lw.A.detach(), lw.B.detach(), lw.scaling, float(w)))
    return parts


def _config_for(ranks: Mapping[str, int], template: LoraConfig, tied: bool = False) -> LoraConfig:
    """A PEFT-style config whose scaling is 1 on every module: lora_alpha = r per module; with
    `tied`, ensure_weight_tying (the tied heads are not in target_modules, as after PEFT's rewrite)."""
    r = max(ranks.values())
    pattern = {re.escape(path): rk for path, rk in ranks.items() if rk != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern), task_type=template.task_type,
                      base_model_name_or_path=template.base_model_name_or_path,
                      lora_dropout=template.lora_dropout, init_lora_weights=False, ensure_weight_tying=tied)
