"""EVA, explained variance adaptation (Paischer et al. 2024, arXiv:2410.07170, §3): A holds the
principal directions of each layer's inputs, B is zero, and the rank budget goes to the layers
whose inputs those directions explain best.

From the batches (model in eval mode, no gradients) each target's input rows x [in] are
gathered: for dict batches only the tokens where ``attention_mask`` is set and, with
``use_label_mask``, ``labels != label_mask_value``. Their covariance Σ [in, in] (float64, mean
removed) gives eigenpairs ``λ_1 >= λ_2 >= ...`` with eigenvectors u_i, and explained-variance
ratios ``λ_i / tr Σ``. Layers fed the same inputs (q/k/v, gate/up) form a group whose first
layer in module order, its source, is decomposed for all of them. Redistribution over the layers
ℓ with ranks r_ℓ, as PEFT does it (`redistribute`): each layer offers its first ``round(ρ·r)``
ratios, r the largest rank of its group; the ``Σ_ℓ r_ℓ`` largest of all offered ratios are kept,
a layer's new rank is how many of its own were kept, and a source kept fewer than a member of
its group swaps ranks with it. The members of a group offer equal ratios; which of them keeps
one at the cut is decided, as in PEFT, by an unstable sort of PEFT's list (`redistribute`). Then
``A = [u_1 … u_k]ᵀ`` [k, in] (with ``whiten``, row i divided by √σ_i, σ_i = √((n−1)λ_i) the
singular value of the centred inputs) and ``B = 0`` [out, k]: the model is unchanged at step 0.

`prepare` returns the config to wrap with: target_modules lists the layers whose rank is above
0 (a layer of rank 0 gets no adapter, as in PEFT), rank_pattern the ranks that differ from r,
and with ``adjust_scaling_factors`` alpha_pattern ``α·k/r`` so the scale α/r stays the layer's.

PEFT computes the components with an incremental, randomised PCA (``svd_lowrank``) repeated
over the batches until consecutive estimates agree (cosine >= ``tau``); lorafit computes them
exactly from all the batches once, so ``tau`` has nothing to decide. Both estimate the same
principal subspaces. With ``whiten``, PEFT divides the components a group shares in place, once
per member whose rank reaches them; lorafit divides each layer's once. Linear layers only (as
PEFT); the base may be quantised (it is not rewritten).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..registry import InitScheme, find_kind
from .prepared import Preparation, Prepared, after_prepare, collect_inputs, keep, out_features, take


@dataclass
class EvaConfig:
    """PEFT's EvaConfig (see the module docstring): rho >= 1, tau in [0, 1]."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ConfigError(f"LoraConfig.eva_config.rho = {self.rho!r} is invalid: expected a number >= 1")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"LoraConfig.eva_config.tau = {self.tau!r} is invalid: expected a number in [0, 1]")


class Moments:
    """Running count n, sum Σx [in] and Gram Σxxᵀ [in, in] of input rows, in float64."""

    n = 0
    sum: Tensor
    gram: Tensor

    def add(self, rows: Tensor) -> None:
        rows = rows.double()
        if self.n == 0:
            self.sum, self.gram = rows.sum(0), rows.T @ rows
        else:
            self.sum, self.gram = self.sum + rows.sum(0), self.gram + rows.T @ rows
        self.n += rows.shape[0]

    def principal(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues λ [in] (descending) and eigenvectors [in, in] (rows) of the covariance."""
        mean = self.sum / self.n
        covariance = (self.gram - self.n * torch.outer(mean, mean)) / (self.n - 1)
        values, vectors = torch.linalg.eigh(covariance)
        return values.flip(0).clamp_min(0), vectors.flip(1).T


def kept_rows(x: Tensor, batch, settings: EvaConfig) -> Tensor:
    """The input rows [tokens, in] of the tokens the masks keep (see the module docstring)."""
    if isinstance(batch, dict) and "input_ids" in batch and x.dim() == 3:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        if settings.use_label_mask and "labels" in batch:
            mask = mask & (batch["labels"] != settings.label_mask_value)
        if mask.shape == x.shape[:2]:
            return x[mask]
    return x.reshape(-1, x.shape[-1])


def sources_of(moments: dict[str, Moments]) -> dict[str, str]:
    """{path: its source}: the first layer, in module order, whose inputs have the same count,
    sum and Gram matrix (bitwise), as layers fed the same tensor have; a layer is its own source
    otherwise. PEFT groups the layers whose inputs of the first batch hash equal."""
    sources: dict[str, str] = {}
    buckets: dict[tuple, list[str]] = {}
    for path, m in moments.items():
        bucket = buckets.setdefault((m.n, tuple(m.sum.tolist())), [])
        sources[path] = next((s for s in bucket if torch.equal(moments[s].gram, m.gram)), path)
        if sources[path] == path:
            bucket.append(path)
    return sources


def redistribute(ratios: dict[str, Tensor], ranks: dict[str, int], rho: float,
                 sources: dict[str, str]) -> dict[str, int]:
    """{path: new rank} by PEFT 0.21.2's rule. `ratios` holds each source's explained-variance
    ratios (descending); a layer offers its source's first round(ρ·r), r the largest rank in
    its group. The offers are listed sources first (module order), then the other members,
    group by group in their sources' order, each group in module order, and ranked by
    ``argsort(descending=True)`` on the ratios' device. That sort is not stable (on the CPU
    beyond 16 values): the equal ratios that the members of a group offer come out in an order
    that depends on all the offered values, as in PEFT. A layer's rank is how many of the
    ``Σ ranks`` first it offered; then each member, in the listed order, kept more than its
    source swaps ranks with it, so a source ends with its group's largest rank."""
    offer: dict[str, int] = {}
    for path, source in sources.items():
        offer[source] = max(offer.get(source, 0), round(rho * ranks[path]))
    members = [path for source in offer for path, own in sources.items() if own == source != path]
    listed = list(offer) + members
    offered = [ratios[sources[path]][: offer[sources[path]]] for path in listed]
    owners = [path for path, values in zip(listed, offered) for _ in range(len(values))]
    new = dict.fromkeys(sources, 0)
    for i in torch.cat(offered).argsort(descending=True)[: sum(ranks.values())].tolist():
        new[owners[i]] += 1
    for path in members:
        source = sources[path]
        if new[path] > new[source]:
            new[path], new[source] = new[source], new[path]
    return new


def prepare_eva(preparation: Preparation) -> LoraConfig:
    config, settings = preparation.config, preparation.settings
    moments = {path: Moments() for path, _ in preparation.targets}
    collect_inputs(preparation, lambda path, x, batch: moments[path].add(kept_rows(x, batch, settings)),
                   "the inputs of each layer")
    short = [path for path, m in moments.items() if m.n < 2]
    if short:
        raise ConfigError(f"EVA: fewer than 2 input rows reached {short}; give more batches")
    sources = sources_of(moments)
    principal = {path: moments[path].principal() for path in dict.fromkeys(sources.values())}
    ratios = {path: values / values.sum() for path, (values, _) in principal.items()}
    ranks = {path: config.rank_for(path) for path in moments}
    new_ranks = redistribute(ratios, ranks, settings.rho, sources)
    kept = [path for path in moments if new_ranks[path] > 0]
    rank_pattern, alpha_pattern = {}, {}
    for path in kept:
        k, alpha = new_ranks[path], config.alpha_for(path)
        if settings.adjust_scaling_factors:
            alpha = alpha * k / ranks[path]
        if k != config.r:
            rank_pattern[path] = k
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    if not kept:
        raise ConfigError("EVA: every layer was given rank 0")
    new_config = config.replace(target_modules=kept, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    modules = dict(preparation.targets)
    for path in kept:
        values, vectors = principal[sources[path]]
        k = new_ranks[path]
        A = vectors[:k]
        if settings.whiten:
            A = A / ((moments[path].n - 1) * values[:k]).sqrt().sqrt()[:, None]
        B = torch.zeros(out_features(modules[path]), k)
        keep(Prepared(path, A.float(), B, new_config.scaling_for(path)), modules[path])
    return new_config


def check_target(config, name: str, module: nn.Module) -> None:
    if not find_kind(module).linear:
        raise ConfigError(f"LoraConfig.init_lora_weights = 'eva' cannot apply to {name!r} "
                          f"({type(module).__name__}): only linear layers are supported")


EVA = InitScheme("eva", take, spelling="'eva'", check_target=after_prepare(check_target), settings="eva_config",
                 settings_type=EvaConfig, prepare=prepare_eva)
