"""`LoraConfig`: which modules get an adapter, of what rank and scale, initialised how.

Field names and meanings follow PEFT's ``LoraConfig`` so an existing ``adapter_config.json`` or a
PEFT user's keyword arguments carry over unchanged. The config is validated on construction and
never mutated by lorafit: `wrap` and the adapter files work on copies.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from .errors import ConfigError
from .registry import check_init_settings, claimed_fields, find_init, selected_variant
from .schema import check_keys, is_int, is_number, require

BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter.

    For a targeted layer with frozen weight W [out, in] the adapter adds ``s · B A`` with
    A [r, in], B [out, r] and scaling ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
    ``use_rslora``, Kalajdzievski 2023). ``rank_pattern`` / ``alpha_pattern`` override r and
    lora_alpha for modules whose name ends with the (regex) key.
    """

    r: int = 8
    """Rank of the update: A is [r, in], B is [out, r]."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA)."""
    target_modules: Optional[Union[list[str], str]] = None
    """Modules that get an adapter: a list of names or dotted suffixes, a regex (full match), or
    ``all-linear`` (every linear layer but the output head). null uses the model type's default."""
    exclude_modules: Optional[Union[list[str], str]] = None
    """Modules never targeted, by the same rules as target_modules."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    fan_in_fan_out: bool = False
    """The base stores its weight as [in, out] (GPT-2's Conv1D); detected automatically for Conv1D."""
    bias: str = "none"
    """Which biases train: ``none``, ``all``, or ``lora_only`` (those of targeted layers)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r) (Kalajdzievski 2023)."""
    modules_to_save: Optional[list[str]] = None
    """Whole modules trained and saved per adapter, e.g. a new classification head."""
    init_lora_weights: Union[bool, str] = True
    """Initialisation: true (A Kaiming-uniform, B zero), ``gaussian``, false (both random, for
    tests), ``pissa`` / ``pissa_niter_K`` (principal singular vectors), ``olora`` (QR),
    ``orthogonal`` (A and B non-zero with B A = 0; even r); from data or the quantised weights,
    after ``lorafit.inits.prepare`` (see the README's initialisations section): ``eva``
    (principal directions of the layer inputs, ranks redistributed), ``corda`` (SVD of W times the
    input covariance), ``lora_ga`` (SVD of the full-weight gradient), ``loftq`` (cancels the nf4 /
    int8 quantisation error)."""
    layers_to_transform: Optional[Union[list[int], int]] = None
    """Only these layer indices get adapters (with list-valued target_modules)."""
    layers_pattern: Optional[Union[list[str], str]] = None
    """Name of the layer list the indices count in, such as ``layers`` or ``h``; default: common names."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matching the end of a module name: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module lora_alpha overrides, keyed like rank_pattern."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output row over the normalised W + sBA (Liu et al. 2024)."""
    lora_bias: bool = False
    """A trainable bias on B: the adapter adds s·(B A x + b); merging adds s·b to the base bias."""
    task_type: Optional[str] = None
    """PEFT's task type label, such as ``CAUSAL_LM``, saved in adapter_config.json."""
    base_model_name_or_path: Optional[str] = None
    """The base model the adapter was trained on, saved in adapter_config.json."""
    inference_mode: bool = False
    """Freeze the adapter (set when loading an adapter for inference)."""
    # PEFT features whose non-default value needs an extension that implements it (`FEATURES`).
    use_qalora: bool = False
    """QA-LoRA (PEFT): not implemented; must stay false."""
    target_parameters: Optional[list[str]] = None
    """LoRA on nn.Parameter tensors such as the 3-D MoE expert weights, each entry
    ``<module path or suffix>.<parameter>`` (``experts.gate_up_proj``): for W [E, out, in]
    A is [E·r, in], B [out, r·E] and ``ΔW[e] = s · B_e A_e``; needs lora_dropout 0. With it,
    target_modules may be ``[]`` (null means ``[]`` too, as in PEFT)."""
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    """Train only these token rows, e.g. new special tokens: a list of token ids for the input
    embeddings, or {module name: ids} (an embedding or a linear output head). Each chosen row is
    replaced by a trained row V[k] (initialised to the old one); an output head tied to the
    embedding uses the same rows."""
    layer_replication: Optional[list[list[int]]] = None
    """A deeper model from the base's layers: ``[[0, 4], [2, 5]]`` makes layers [0..4] into
    [0, 1, 2, 3, 2, 3, 4]; repeated layers share weights and get adapters of their own. It
    rewrites the base, so such an adapter is refused in mixed batches, merges and lorafit serve."""
    ensure_weight_tying: bool = False
    """Keep tied input/output embeddings tied in the adapter (PEFT). When target_modules or
    modules_to_save names the embedding or the tied head, the embedding gets the adapter and the
    head shares it: a LoRA head's factors are the embedding's transposed (A_head = B_embᵀ,
    B_head = A_embᵀ, so ΔH = ΔE; as in PEFT they are parameters of their own over the same
    storage), a modules_to_save head uses the embedding copy's weight; merging keeps the two
    tied. Trainable token rows of a tied head follow the embedding's whenever their indices
    agree; with this flag, different indices are an error."""
    alora_invocation_tokens: Optional[list[int]] = None
    """Activated LoRA (PEFT): not implemented; must stay null."""
    use_bdlora: Optional[dict[str, Any]] = None
    """Block-diagonal LoRA (PEFT): not implemented; must stay null."""
    arrow_config: Optional[dict[str, Any]] = None
    """Arrow routing between adapters (PEFT): not implemented; must stay null."""
    kasa_config: Optional[dict[str, Any]] = None
    """KaSA (PEFT): not implemented; must stay null."""
    monteclora_config: Optional[dict[str, Any]] = None
    """MonteCLoRA (PEFT): not implemented; must stay null."""
    eva_config: Optional[dict[str, Any]] = None
    """Options of ``init_lora_weights: eva`` (PEFT's EvaConfig keys: rho, tau, use_label_mask,
    label_mask_value, whiten, adjust_scaling_factors); null uses the defaults."""
    corda_config: Optional[dict[str, Any]] = None
    """Options of ``init_lora_weights: corda`` (PEFT's CordaConfig keys; corda_method ``ipm`` or
    ``kpm``); null uses the defaults."""
    lora_ga_config: Optional[dict[str, Any]] = None
    """Options of ``init_lora_weights: lora_ga`` (PEFT's LoraGAConfig keys: direction, scale,
    stable_gamma); null uses the defaults."""
    loftq_config: Optional[dict[str, Any]] = None
    """Options of ``init_lora_weights: loftq`` (PEFT's LoftQConfig keys: loftq_bits 4 or 8,
    loftq_iter); null uses the defaults."""

    def __post_init__(self) -> None:
        """Validate every field, naming the first bad one, and normalise container fields to
        fresh lists and dicts (the caller's containers are never changed)."""
        self._check_scalars()
        find_init(self.init_lora_weights)
        _check_features(self)
        check_init_settings(self)
        self._check_flags()
        self._normalise_targets()
        self._normalise_layer_selection()
        self._normalise_patterns()

    def _check_scalars(self) -> None:
        require(is_int(self.r) and self.r > 0, "LoraConfig.r", self.r, "a positive integer")
        require(is_number(self.lora_alpha) and self.lora_alpha > 0,
                "LoraConfig.lora_alpha", self.lora_alpha, "a positive number")
        require(is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0,
                "LoraConfig.lora_dropout", self.lora_dropout, "a number in [0, 1)")
        require(self.bias in BIAS_MODES, "LoraConfig.bias", self.bias, f"one of {list(BIAS_MODES)}")

    def _check_flags(self) -> None:
        """The boolean fields are booleans, and at most one variant is selected."""
        for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode", "ensure_weight_tying"):
            value = getattr(self, flag)
            require(isinstance(value, bool), f"LoraConfig.{flag}", value, "true or false")
        selected_variant(self)

    def _normalise_targets(self) -> None:
        """target_parameters, trainable_token_indices, target_modules, exclude_modules and
        modules_to_save: checked, lists made lists; ``target_modules = []`` means parameters only."""
        if self.target_parameters is not None:
            require(isinstance(self.target_parameters, (list, tuple)) and self.target_parameters
                    and all(isinstance(p, str) and "." in p for p in self.target_parameters),
                    "LoraConfig.target_parameters", self.target_parameters,
                    "a non-empty list of '<module path or suffix>.<parameter>' names")
            self.target_parameters = list(self.target_parameters)
            if not self.target_modules:  # PEFT's spelling of "parameters only"
                self.target_modules = []
        if self.trainable_token_indices is not None:
            tokens = self.trainable_token_indices
            require(isinstance(tokens, (list, dict)) and bool(tokens) and all(
                isinstance(k, str) and isinstance(v, list) for k, v in tokens.items())
                if isinstance(tokens, dict) else isinstance(tokens, list) and bool(tokens),
                "LoraConfig.trainable_token_indices", tokens, "a list of token ids or {module name: [token ids]}")
        if self.target_modules != [] or not self.target_parameters:
            self.target_modules = _selector("target_modules", self.target_modules)
        self.exclude_modules = _selector("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            require(isinstance(self.modules_to_save, (list, tuple))
                    and all(isinstance(m, str) and m for m in self.modules_to_save),
                    "LoraConfig.modules_to_save", self.modules_to_save, "a list of module names")
            self.modules_to_save = list(self.modules_to_save)

    def _normalise_layer_selection(self) -> None:
        """layers_to_transform (an index or a list of them) and layers_pattern (a name or a list)."""
        if is_int(self.layers_to_transform):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            require(isinstance(self.layers_to_transform, (list, tuple))
                    and all(is_int(i) and i >= 0 for i in self.layers_to_transform),
                    "LoraConfig.layers_to_transform", self.layers_to_transform,
                    "a layer index or a list of indices >= 0")
            self.layers_to_transform = list(self.layers_to_transform)
            require(not isinstance(self.target_modules, str), "LoraConfig.layers_to_transform",
                    self.layers_to_transform, "a list-valued target_modules (a regex target selects layers itself)")
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        if self.layers_pattern is not None:
            require(self.layers_to_transform is not None, "LoraConfig.layers_pattern", self.layers_pattern,
                    "to be used together with layers_to_transform")

    def _normalise_patterns(self) -> None:
        """rank_pattern and alpha_pattern: regex keys, positive values, copied to plain dicts."""
        for name, table, ok, what in (
            ("rank_pattern", self.rank_pattern, lambda v: is_int(v) and v > 0, "positive integer ranks"),
            ("alpha_pattern", self.alpha_pattern, lambda v: is_number(v) and v > 0, "positive alphas"),
        ):
            require(isinstance(table, Mapping), f"LoraConfig.{name}", table,
                    "a mapping of module-name pattern to value")
            for key, value in table.items():
                require(ok(value), f"LoraConfig.{name}[{key!r}]", value, what)
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ConfigError(f"{name}: key {key!r} is not a valid regular expression ({exc})") from None
            setattr(self, name, dict(table))

    # -- per-module values -------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """The rank for `module_name`: the first matching `rank_pattern` key, else `r`."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for `module_name`."""
        return scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    # -- conversion ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "LoraConfig") -> "LoraConfig":
        """Build from plain data, refusing unknown keys with the closest valid name suggested."""
        check_keys(data, field_names(), where)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A validated copy with `changes` applied; the original is left as it was."""
        return dataclasses.replace(self, **changes)


# LoraConfig fields that switch on a PEFT feature, and what it does. A non-default value needs an
# extension that claims the field (`lorafit.registry.claimed_fields`); others are refused by name.
FEATURES = {
    "use_dora": "DoRA", "lora_bias": "a trainable bias on lora_B",
    "use_qalora": "QA-LoRA (input pooling for quantised bases)",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. MoE experts)",
    "ensure_weight_tying": "adapters on tied embeddings kept tied",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication (a deeper model built from shared layers)",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)", "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters", "kasa_config": "KaSA (learned singular values between A and B)",
    "monteclora_config": "MonteCLoRA (variational sampling)",
    "eva_config": "EVA initialisation", "corda_config": "CorDA initialisation",
    "lora_ga_config": "LoRA-GA initialisation", "loftq_config": "LoftQ initialisation",
}


def _check_features(config: "LoraConfig") -> None:
    claimed = claimed_fields()
    refused = [f"{name} = {getattr(config, name)!r} ({what})" for name, what in FEATURES.items()
               if name not in claimed and not is_default(getattr(config, name))]
    if refused:
        raise ConfigError(f"uses PEFT features lorafit does not implement, so its outputs would differ: "
                          f"{'; '.join(refused)}")


def is_default(value: Any) -> bool:
    """None, False or an empty container: PEFT's way of saying a feature is off."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The LoRA scale s: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(LoraConfig)]


def _pattern_value(table: Mapping[str, Any], module_name: str, default: Any) -> Any:
    for key, value in table.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return value
    return default


def _selector(name: str, value: Any) -> Optional[Union[list[str], str]]:
    if value is None:
        return None
    if isinstance(value, str):
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"LoraConfig.{name} = {value!r} is not a valid regular expression ({exc})") from None
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ConfigError(
        f"LoraConfig.{name} = {value!r} is invalid: expected a non-empty list of module names, "
        f"a regular expression string, or {ALL_LINEAR!r}"
    )
