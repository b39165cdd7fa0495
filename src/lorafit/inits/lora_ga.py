"""LoRA-GA (Wang et al. 2024, arXiv:2407.05000, §3.2-3.3): factors aligned with the gradient of
full fine-tuning, so the first steps of LoRA follow those of full training.

G [out, in] is the mean over the batches of ∂loss/∂W (each batch's loss as the model returns it;
model in train mode, only the targets' weights requiring gradients). With the randomised
``U S Vᵀ = torch.svd_lowrank(G, q=min(4r, out, in), niter=4)`` (it draws from torch's RNG, one
call per layer in module order) cut to 2r triplets, ``direction`` picks which go to A and B:

    ArB2r: A = V_{:r}ᵀ,      B = U_{r:2r} S_{r:2r}       (default)
    A2rBr: A = V_{r:2r}ᵀ,    B = U_{:r} S_{:r}
    ArBr:  A = V_{odd}ᵀ,     B = U_{even} S_{even}
    random: one random subset of r indices (torch.randperm) for both

``scale`` then multiplies B by ``out^¼ / √stable_gamma`` (stable), by σ₁(W) / the first picked
singular value of G (weight_svd, σ₁ from ``svd_lowrank(W, q=r)``), divides A and B by s
(gd_scale) or leaves them (unit). The factors are rounded to the base dtype and the base becomes
``W − s·B A`` so the model is unchanged at step 0 (`InitScheme.rewrites_base`; ship it like PiSSA,
see `lorafit.inits.conversion`). Linear layers with 2r <= min(out, in), full-precision bases only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..registry import InitScheme
from .prepared import Preparation, Prepared, after_prepare, keep_all, out_in, take
from .svd_base import check_decomposable


@dataclass
class LoraGAConfig:
    """PEFT's LoraGAConfig (see the module docstring for each value)."""

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: int = 16


def mean_gradients(preparation: Preparation) -> dict[str, Tensor]:
    """{path: mean ∂loss/∂W over the batches, [out, in] fp32}; requires_grad flags and the
    train/eval mode are restored afterwards."""
    model, targets = preparation.model, preparation.targets
    weights = [module.weight for _, module in targets]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    totals = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    count = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        model.train()
        with preparation.adapters_off(), torch.enable_grad():
            for batch in preparation.each_batch("the gradient of the loss"):
                grads = torch.autograd.grad(loss_of(preparation.run(model, batch)), weights, allow_unused=True)
                for total, grad in zip(totals, grads):
                    if grad is not None:
                        total += grad.float()
                count += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {path: out_in(module, total / count) for (path, module), total in zip(targets, totals)}


def loss_of(output) -> Tensor:
    loss = getattr(output, "loss", output)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ConfigError("init_lora_weights = 'lora_ga' needs a scalar loss: the model's output has no .loss "
                          "(give batches with labels, or a run(model, batch) that returns the loss)")
    return loss


def lora_ga_factors(grad: Tensor, weight: Tensor, r: int, scaling: float, settings: LoraGAConfig
                    ) -> tuple[Tensor, Tensor]:
    """``(A [r, in], B [out, r])`` from the gradient G and base weight W, both [out, in] fp32."""
    U, S, V = torch.svd_lowrank(grad, q=min(4 * r, *grad.shape), niter=4)
    U, S, Vh = U[:, : 2 * r], S[: 2 * r], V.T[: 2 * r]
    if settings.direction == "random":
        to_a = to_b = torch.randperm(2 * r)[:r]
    else:
        to_a, to_b = {"ArB2r": (slice(0, r), slice(r, 2 * r)), "A2rBr": (slice(r, 2 * r), slice(0, r)),
                      "ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2))}[settings.direction]
    A, B, picked = Vh[to_a], U[:, to_b] * S[to_b], S[to_b]
    if settings.scale == "stable":
        B = B * grad.shape[0] ** 0.25 / settings.stable_gamma ** 0.5
    elif settings.scale == "weight_svd":
        weight_top = torch.svd_lowrank(weight, q=r, niter=4)[1][0]
        if picked[0] > 0:
            B = B * weight_top / picked[0]
    elif settings.scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return A, B


def prepare_lora_ga(preparation: Preparation) -> LoraConfig:
    config, settings = preparation.config, preparation.settings
    grads = mean_gradients(preparation)

    def factors(path: str, module: nn.Module) -> Prepared:
        weight = out_in(module, module.weight.detach())
        s = config.scaling_for(path)
        A, B = lora_ga_factors(grads[path], weight.float(), config.rank_for(path), s, settings)
        A, B = A.to(weight.dtype).float(), B.to(weight.dtype).float()  # the offset of the factors as stored
        return Prepared(path, A, B, s, weight=weight.float() - s * (B @ A))

    return keep_all(preparation, factors)


def check_target(config, name: str, module: nn.Module) -> None:
    """`check_decomposable`, and 2r singular triplets must exist: 2r <= min(out, in)."""
    check_decomposable(config, name, module)
    r = config.rank_for(name)
    if 2 * r > min(module.weight.shape):
        raise ConfigError(f"LoraConfig.init_lora_weights = 'lora_ga' cannot apply to {name!r}: it takes 2r = {2 * r} "
                          f"singular vectors of the gradient, more than min(out, in) = {min(module.weight.shape)}")


LORA_GA = InitScheme("lora_ga", take, spelling="'lora_ga'", check_target=after_prepare(check_target),
                     rewrites_base=True, settings="lora_ga_config", settings_type=LoraGAConfig,
                     prepare=prepare_lora_ga)
