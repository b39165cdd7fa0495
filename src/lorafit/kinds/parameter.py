"""LoRA on a module's `nn.Parameter` instead of on the module (PEFT's ``target_parameters``).

transformers' mixture-of-experts blocks (Mixtral, Qwen3-MoE, GPT-OSS) keep all experts' weights
in one 3-D parameter, e.g. ``experts.gate_up_proj`` [E, 2·inter, hidden] and ``experts.down_proj``
[E, hidden, inter], each expert e computing ``F.linear(x, W[e])``. No module-level LoRA reaches
them; a `LoraParameter` runs the module it wraps with ``W + ΔW`` in place of W.

For W [E, out, in] an adapter of rank r has A [E·r, in] and B [out, r·E] (PEFT's layout: A's
rows are expert-major, B's columns rank-major), and per expert

    ΔW[e] = s · B_e A_e,   A_e = A.reshape(E, r, in)[e] [r, in],   B_e = B.reshape(out, r, E)[:, :, e] [out, r].

A module marked ``is_transposed`` (GPT-OSS) stores W as [E, in, out] and gets ``ΔW[e] = s · (B_e A_e)ᵀ``.
A 2-D W [out, in] is the E = 1 case, ``ΔW = s · B A`` as for a linear layer. Dropout would have
to act on inputs inside the wrapped module, so lora_dropout must be 0 (as in PEFT); any variant
(DoRA, lora_bias, ...), fan_in_fan_out and the initialisations that read the base weight are
refused too.

Two targeted parameters of one module nest: the one the module registers first is wrapped
first, so its layer is the inner one (``experts.base_layer``) and the other the outer one
(``experts``), whatever the order in the config: PEFT's file layout. Every adapter of a model
that sets target_parameters must target the same parameters (PEFT's rule: the nesting is shared).
"""

from __future__ import annotations

import functools
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import AdapterError, ConfigError, TargetError
from ..layers import LoraLayer, LoraWeights
from ..registry import SourceTarget, TargetSource, find_init, selected_variant
from ..routing import Route, RowAdapters
from ..surgery import has_suffix, module_target_paths, walk

DEFAULT_INITS = (True, False, "gaussian")


class ParameterWeights(LoraWeights):
    """A and B of an adapter on a parameter of `experts` stacked matrices (1 for a 2-D one)."""

    fusable = False
    gatherable = False
    file_keys = {"A": "lora_A.weight", "B": "lora_B.weight"}  # PEFT's, as for a linear layer

    def __init__(self, A: Tensor, B: Tensor, scaling: float, dropout_p: float = 0.0, experts: int = 0,
                 transposed: bool = False):
        super().__init__(A, B, scaling, dropout_p)
        self.experts = experts  # 0: the parameter is 2-D
        self.transposed = transposed  # W stored [E, in, out]

    def delta(self) -> Tensor:
        """ΔW in fp32 shaped like W: [E, out, in] (``ΔW[e] = s · B_e A_e``), [E, in, out] when
        `transposed`, or [out, in] for a 2-D parameter."""
        experts = max(self.experts, 1)
        r = self.A.shape[0] // experts
        a = self.A.float().reshape(experts, r, -1)  # (E, r, in)
        b = self.B.float().reshape(self.B.shape[0], r, experts).permute(2, 0, 1)  # (E, out, r)
        delta = self.scaling * (b @ a)  # (E, out, in)
        if self.transposed:
            delta = delta.transpose(-2, -1)
        return delta if self.experts else delta[0]


class LoraParameter(LoraLayer):
    """Runs `base_layer` with its parameter `parameter_name` replaced by ``W + Σ ΔW`` of the
    running adapters. `base_layer` may itself be a `LoraParameter` (two parameters of one module)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.weight_view().shape
        self.experts = shape[0] if len(shape) == 3 else 0
        self.transposed = bool(self.experts and getattr(self.owner()[0], "is_transposed", False))
        self.out_features, self.in_features = (shape[-1], shape[-2]) if self.transposed else (shape[-2], shape[-1])

    def owner(self) -> tuple[nn.Module, str]:
        """The module holding the parameter, and its name relative to `base_layer`."""
        module, prefix = self.base_layer, ""
        while isinstance(module, LoraParameter):
            module, prefix = module.base_layer, prefix + "base_layer."
        return module, prefix + self.parameter_name

    def weight_view(self) -> Tensor:
        module, _ = self.owner()
        return getattr(module, self.parameter_name)

    def factor_shapes(self, r):
        stacked = r * max(self.experts, 1)
        return (stacked, self.in_features), (self.out_features, stacked)

    def create(self, name, r, scaling, dropout=0.0, init=True, variant=None) -> LoraWeights:
        """Add adapter `name` (plain LoRA, no dropout: `find_parameter_targets` checked the config)."""
        a_shape, b_shape = self.factor_shapes(r)
        self.add(name, ParameterWeights(torch.empty(a_shape), torch.empty(b_shape), scaling, experts=self.experts,
                                        transposed=self.transposed))
        weights = self.lora[name]
        find_init(init).init(self, weights, init)
        return weights

    def path(self, x: Tensor, route: Route) -> str:
        """`LoraLayer.path`, seeing one entry per batch row: MoE blocks flatten (row, token) pairs
        row-major into the leading dimension, which `forward_rows` maps back to rows."""
        if route.rows is not None and not route.disabled:
            x = x.new_empty((len(route.rows.names), 0)) if self.per_row(x, route.rows) else x
        return super().path(x, route)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        route = self.router.route
        path = self.path(x, route)
        if path == "base":
            return self.base_forward(x, *args, **kwargs)
        if path == "rows":
            return self.forward_rows(x, route, *args, **kwargs)
        return self.run_with(self.running(route), x, *args, **kwargs)

    def run_with(self, names: list[str], *args, **kwargs):
        """The wrapped module's output with ``W + Σ ΔW`` of adapters `names` (in W's dtype, as PEFT)."""
        if not names:
            return self.base_layer(*args, **kwargs)
        weight = self.weight_view()
        updated = weight + sum(self.lora[n].delta() for n in names).to(weight.dtype)
        return functional_call(self.base_layer, {self.owner()[1]: updated}, args, kwargs)

    @staticmethod
    def per_row(x: Tensor, rows: RowAdapters) -> int:
        """How many leading entries of x each batch row has (1, or its tokens), or 0 if unknown."""
        return x.shape[0] // len(rows.names) if x.shape[0] % len(rows.names) == 0 else 0

    def forward_rows(self, x: Tensor, route: Route, *args, **kwargs) -> Tensor:
        """Mixed batch: the entries of each adapter's rows (and of the base rows) run the module
        with that adapter's weight; every tensor argument with x's leading size is split alike."""
        names = route.rows.names
        per_row = self.per_row(x, route.rows)
        if not per_row:
            raise AdapterError(f"adapter_names has {len(names)} entries but {type(self.owner()[0]).__name__} "
                               f"got {x.shape[0]} inputs, not a multiple of it")
        lead = x.shape[0]

        def split(value, idx):
            return value[idx] if isinstance(value, Tensor) and value.dim() and value.shape[0] == lead else value

        result = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            idx = (rows[:, None] * per_row + torch.arange(per_row, device=x.device)).flatten()  # (rows·per_row,)
            sub_args = [split(a, idx) for a in (x, *args)]
            sub_kwargs = {k: split(v, idx) for k, v in kwargs.items()}
            with self.router.using(rows=RowAdapters([name] * len(rows))):  # an inner layer sees these rows only
                out = self.run_with([name] if name in self.lora else [], *sub_args, **sub_kwargs)
            result = out.new_zeros((lead, *out.shape[1:])) if result is None else result
            result = result.index_put((idx,), out)
        return result


def find_parameter_targets(config, root: nn.Module) -> list[SourceTarget]:
    """The parameters `config.target_parameters` selects in `root`, innermost layer first.

    An entry selects parameter ``P.n`` (module path P, parameter name n) when it equals
    ``P.n`` or is a dotted suffix of it. ConfigError/TargetError name what is refused."""
    _check_config(config)
    wanted = list(config.target_parameters)
    targeted = module_target_paths(root, config)
    found, matched = [], set()
    for path, module in walk(root):
        owner, chain = module, []
        while isinstance(owner, LoraParameter):
            chain.insert(0, owner)
            owner = owner.base_layer
        base = owner.base_layer if isinstance(owner, LoraLayer) else owner
        names = [n for n, _ in base.named_parameters(recurse=False) if has_suffix(f"{path}.{n}", wanted)]
        if not names:
            continue
        matched.update(e for e in wanted for n in names if has_suffix(f"{path}.{n}", [e]))
        if owner is not base or path in targeted:
            raise ConfigError(f"LoraConfig.target_parameters selects {path}.{names[0]}, but {path!r} is "
                              f"also targeted by target_modules; target one or the other")
        if chain and [w.parameter_name for w in chain] != names:
            raise ConfigError(f"LoraConfig.target_parameters selects {names} of {path!r}, but another adapter "
                              f"targets {[w.parameter_name for w in chain]} there: adapters that use "
                              f"target_parameters must all target the same parameters")
        for i, name in enumerate(names):
            shape = tuple(getattr(base, name).shape)
            if len(shape) not in (2, 3):
                raise ConfigError(f"LoraConfig.target_parameters: {path}.{name} has shape {shape}; "
                                  f"expected a 2-D [out, in] or 3-D [experts, out, in] parameter")
            probe = chain[i] if chain else LoraParameter(base, name)  # for the shapes; not placed
            r = parameter_rank(config, path, name)
            a_shape, b_shape = probe.factor_shapes(r)
            add = functools.partial(_add, r=r, scaling=config.scaling_for(pattern_key(path, name)),
                                    init=config.init_lora_weights)
            make = None if chain else functools.partial(LoraParameter, parameter_name=name)
            found.append(SourceTarget(layer_path(path, i, len(names)), path, make, add, {"A": a_shape, "B": b_shape},
                                      ParameterWeights.file_keys))
    missing = [e for e in wanted if e not in matched]
    if missing:
        raise TargetError(f"LoraConfig.target_parameters entries {missing} match no parameter of "
                          f"{type(root).__name__} (write them as '<module path or suffix>.<parameter>', "
                          f"e.g. 'experts.gate_up_proj')")
    return found


def pattern_key(path: str, name: str) -> str:
    """What rank_pattern / alpha_pattern keys match for parameter `name` of the module at
    `path`: the parameter's name ``path.name``, not its layer's (as in PEFT)."""
    return f"{path}.{name}"


def parameter_rank(config, path: str, name: str) -> int:
    """The rank `config` gives parameter `name` of the module at `path` (A has rank·E rows)."""
    return config.rank_for(pattern_key(path, name))


def layer_path(path: str, index: int, count: int) -> str:
    """The layer path of the `index`-th of the `count` targeted parameters of the module at
    `path`, in the order the module registers them: the first one's layer is the innermost."""
    return path + ".base_layer" * (count - 1 - index)


def _add(layer: LoraParameter, name: str, r: int, scaling: float, init) -> None:
    layer.create(name, r, scaling, init=init)


def _check_config(config) -> None:
    """Refuse, by its field, what a `LoraParameter` cannot do: dropout, any variant of the maths
    (it builds plain `ParameterWeights`), fan_in_fan_out, inits that read the base weight."""
    variant = selected_variant(config)
    refused = [(field, value) for field, value, ok in (
        ("lora_dropout", config.lora_dropout, config.lora_dropout == 0),
        *([(variant.field, getattr(config, variant.field), False)] if variant else []),
        ("fan_in_fan_out", config.fan_in_fan_out, not config.fan_in_fan_out),
        ("init_lora_weights", config.init_lora_weights, config.init_lora_weights in DEFAULT_INITS),
    ) if not ok]
    if refused:
        field, value = refused[0]
        raise ConfigError(f"LoraConfig.{field} = {value!r} cannot be used with target_parameters (the "
                          f"update is added to a weight used inside another module; as in PEFT)")


PARAMETERS = TargetSource("target_parameters", find_parameter_targets)
