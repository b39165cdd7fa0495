"""The extension points: layer kinds, adapter variants and initialisation schemes.

Each extension is one record declared at module level beside its code, in a module of one of
`EXTENSION_PACKAGES`:

* `LayerKind` (``lorafit/kinds/``): which base modules it wraps, the LoRA layer class that wraps
  them, and the PEFT tensor names of its A and B factors;
* `Variant` (``lorafit/variants/``): the `LoraConfig` field that selects it, its `LoraWeights`
  subclass, the PEFT names of its extra tensors, and a check run on every target before any
  layer is replaced;
* `InitScheme` (``lorafit/inits/``): the ``init_lora_weights`` values it accepts, the function
  that fills the factors, a target check, whether it rewrites the base weight, and for schemes
  that need data or the whole config, the `LoraConfig` field of their settings and their
  preparation step (`lorafit.inits.prepare`);
* `TargetSource` (any of them): a `LoraConfig` field naming targets other than modules, such as
  ``target_parameters`` (``lorafit/kinds/parameter.py``), and how to find and wrap them;
* `BaseRewrite` (any of them): a `LoraConfig` field that changes the base's structure before
  targets are found (``layer_replication``, ``lorafit/kinds/replication.py``).

Nothing registers itself: the first lookup imports every module of those packages and collects
the records they define, so what is found never depends on import order, and adding an
extension means adding one file (and its tests).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import nn

from .errors import ConfigError
from .schema import from_dict

EXTENSION_PACKAGES = ("lorafit.kinds", "lorafit.variants", "lorafit.inits")

# check(config, module path, base module): raises ConfigError naming the module, or returns.
TargetCheck = Callable[[Any, str, nn.Module], None]


@dataclass(frozen=True)
class LayerKind:
    """Base modules that `matches` accepts are wrapped by ``wrap(module)`` (a `LoraLayer`).

    `linear` marks kinds that ``"all-linear"`` selects and that linear-only variants accept;
    kinds with a higher `priority` are asked first (a quantised linear before `nn.Linear`).
    `factor_keys` are the PEFT tensor-name suffixes of A and B.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    wrap: Callable[[nn.Module], nn.Module]
    linear: bool = False
    priority: int = 0
    factor_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")


@dataclass(frozen=True)
class Variant:
    """A change to the adapter maths, on when `LoraConfig.<field>` is true.

    `weights` is the `LoraWeights` subclass holding its parameters; `tensor_keys` names its
    parameters beyond A and B in the PEFT file ({parameter: suffix}); `check_target` refuses
    modules it cannot apply to; `excludes` lists config fields it cannot be combined with.
    """

    field: str
    weights: type
    tensor_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    check_target: Optional[TargetCheck] = None
    excludes: tuple[str, ...] = ()


@dataclass(frozen=True)
class InitScheme:
    """An ``init_lora_weights`` value (or family, `pattern` a full-match regex over ``str(value)``).

    ``init(layer, weights, value)`` fills the factors of a freshly created adapter;
    `rewrites_base` marks schemes that also change the base weight (PiSSA, OLoRA), so a loaded
    adapter's fingerprint can only be compared by shape. `spelling` is how error messages list it.

    `settings` names the `LoraConfig` field holding the scheme's options as a dict (PEFT's
    ``eva_config``...) and `settings_type` the dataclass that validates it (built with
    `lorafit.schema.from_dict`, so unknown keys and wrong types are refused by name). `prepare`
    is the step that runs before `wrap` for schemes whose factors need data or the whole config
    (``prepare(preparation) -> LoraConfig``, see `lorafit.inits.prepared`).
    """

    pattern: str
    init: Callable[[Any, Any, Any], None]
    spelling: str
    check_target: Optional[TargetCheck] = None
    rewrites_base: bool = False
    settings: Optional[str] = None
    settings_type: Optional[type] = None
    prepare: Optional[Callable[[Any], Any]] = None

    def parse_settings(self, config: Any) -> Any:
        """The scheme's options from `config` as `settings_type` (defaults when the field is None)."""
        return from_dict(self.settings_type, getattr(config, self.settings),
                         where=f"LoraConfig.{self.settings}")

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return re.fullmatch(self.pattern, str(value)) is not None
        return (isinstance(value, str) and value not in ("True", "False")
                and re.fullmatch(self.pattern, value) is not None)


@dataclass(frozen=True)
class SourceTarget:
    """One target of a `TargetSource`. Its LoRA layer sits at `path` and wraps the module now at
    `at`: ``make(module)`` builds it, or `make` is None when an earlier adapter's layer is there.
    ``add(layer, adapter name)`` gives the layer the adapter, whose parameters have `shapes`
    ({parameter: shape}) and PEFT tensor-name suffixes `keys` ({parameter: suffix})."""

    path: str
    at: str
    make: Optional[Callable[[nn.Module], nn.Module]]
    add: Callable[[nn.Module, str], None]
    shapes: Mapping[str, tuple[int, ...]]
    keys: Mapping[str, str]


@dataclass(frozen=True)
class TargetSource:
    """Adapter targets named by a `LoraConfig` field other than target_modules (PEFT's
    ``target_parameters``, ``trainable_token_indices``), used when that field is set.

    ``find(config, root)`` checks the config against the model, changing nothing, and returns
    the `SourceTarget` list in the order the layers are to be built (inner layers first).
    ``prepare(config, root)``, when given, runs for every config, set field or not, before any
    target is found, and returns the config to adapt `root` with (a new object, or `config`
    itself when nothing changes; PEFT rewrites target_modules / modules_to_save for
    ``ensure_weight_tying``). It must be idempotent: a prepared config saved and loaded again
    prepares to itself.
    """

    field: str
    find: Callable[[Any, nn.Module], list[SourceTarget]]
    prepare: Optional[Callable[[Any, nn.Module], Any]] = None


@dataclass(frozen=True)
class BaseRewrite:
    """A `LoraConfig` field whose value changes the base model's structure before targets are
    found (PEFT's ``layer_replication``). ``rewrite(config, root)`` applies it and returns the
    function that undoes it, or None when the model already has it; it raises ConfigError,
    changing nothing, when it cannot. An adapter that sets the field only fits a rewritten base,
    so it is refused in mixed batches and merges (`rewrites_of`)."""

    field: str
    rewrite: Callable[[Any, nn.Module], Optional[Callable[[], None]]]


@dataclass(frozen=True)
class Extensions:
    kinds: tuple[LayerKind, ...]
    variants: tuple[Variant, ...]
    inits: tuple[InitScheme, ...]
    sources: tuple[TargetSource, ...] = ()
    rewrites: tuple[BaseRewrite, ...] = ()


@functools.lru_cache(maxsize=None)
def extensions() -> Extensions:
    """Every record defined by a module of `EXTENSION_PACKAGES` (imported on first call)."""
    found: dict[type, list] = {LayerKind: [], Variant: [], InitScheme: [], TargetSource: [], BaseRewrite: []}
    for package_name in EXTENSION_PACKAGES:
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{package_name}.{info.name}")
            for value in vars(module).values():
                if type(value) in found and value not in found[type(value)]:
                    found[type(value)].append(value)
    kinds = sorted(found[LayerKind], key=lambda k: -k.priority)
    return Extensions(tuple(kinds), tuple(found[Variant]), tuple(found[InitScheme]), tuple(found[TargetSource]),
                      tuple(found[BaseRewrite]))


def find_kind(module: nn.Module) -> Optional[LayerKind]:
    """The layer kind that wraps `module`, or None when LoRA cannot apply to it."""
    return next((kind for kind in extensions().kinds if kind.matches(module)), None)


def claimed_fields() -> set[str]:
    """The `LoraConfig` feature fields some extension implements (`lorafit.config.FEATURES`):
    variants' selecting fields, init schemes' settings fields, target sources' and base rewrites' fields."""
    return ({v.field for v in extensions().variants} | {s.settings for s in extensions().inits if s.settings}
            | {s.field for s in extensions().sources} | {r.field for r in extensions().rewrites})


def rewrites_of(config: Any) -> list[BaseRewrite]:
    """The base rewrites whose field `config` sets."""
    return [r for r in extensions().rewrites if getattr(config, r.field, None)]


def target_sources(config: Any) -> list[TargetSource]:
    """The target sources whose field `config` sets."""
    return [s for s in extensions().sources if getattr(config, s.field, None)]


def prepared_config(config: Any, root: nn.Module) -> Any:
    """`config` as the target sources adapt it to the model `root` (`TargetSource.prepare`)."""
    for source in extensions().sources:
        if source.prepare is not None:
            config = source.prepare(config, root)
    return config


def check_init_settings(config: Any) -> None:
    """Validate every init scheme's settings field that `config` sets (ConfigError naming the key)."""
    for scheme in extensions().inits:
        if scheme.settings and getattr(config, scheme.settings) is not None:
            scheme.parse_settings(config)


def selected_variant(config: Any) -> Optional[Variant]:
    """The variant `config` turns on (None: plain LoRA). Two at once are refused by name."""
    chosen = [v for v in extensions().variants if getattr(config, v.field, False)]
    for variant in chosen:
        clash = [f for f in variant.excludes if getattr(config, f, False)]
        if clash:
            raise ConfigError(f"LoraConfig.{variant.field} = True cannot be combined with {clash[0]} = True")
    if len(chosen) > 1:
        raise ConfigError(f"LoraConfig: {' and '.join(v.field for v in chosen)} cannot be combined")
    return chosen[0] if chosen else None


def find_init(value: Any) -> InitScheme:
    """The init scheme for an ``init_lora_weights`` value; ConfigError listing the valid ones."""
    scheme = next((s for s in extensions().inits if s.accepts(value)), None)
    if scheme is None:
        raise ConfigError(f"LoraConfig.init_lora_weights = {value!r} is invalid: expected one of "
                          f"{', '.join(s.spelling for s in extensions().inits)}")
    return scheme


def check_targets(config: Any, targets: list[tuple[str, nn.Module]]) -> None:
    """Run the selected variant's and init scheme's checks on every (path, base module)."""
    variant = selected_variant(config)
    checks = [c for c in (variant.check_target if variant else None,
                          find_init(config.init_lora_weights).check_target) if c is not None]
    for path, module in targets:
        for check in checks:
            check(config, path, module)
