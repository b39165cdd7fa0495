"""Loading an adapter directory into a model: check everything, then apply.

`plan` checks a read `AdapterDir` against the model without changing it: the config, that every
targeted module has its tensors and every tensor lands somewhere, shapes and ranks, and the
base-model fingerprint. Only then does `load_adapter` touch the model, with steps that cannot
fail on the file's account (tensor copies of checked shapes), so a failed load leaves the model
exactly as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from ..atomic import PathLike
from ..config import LoraConfig
from ..errors import AdapterError, AdapterFileError, ConfigError, TargetError
from ..layers import LoraLayer, LoraWeights, ModulesToSave
from ..registry import (SourceTarget, Variant, check_targets, extensions, find_init, find_kind, prepared_config,
                        rewrites_of, selected_variant, target_sources)
from ..surgery import find_modules_to_save, find_targets, unwrapped
from . import fingerprints as fp
from .keys import PREFIX, split_lora_key, strip_prefix, tensor_keys
from .peft_config import config_from_peft
from .reading import AdapterDir, AdapterFileWarning, read_adapter_dir

if TYPE_CHECKING:
    from ..model import LoraModel

# Per-model record of what each loaded adapter's file held beyond its LoraConfig, so saving it
# again writes it back: {adapter name: FileRecord}. Stored on the LoraModel instance.
RECORDS_ATTR = "_adapter_file_records"


@dataclass
class FileRecord:
    """The config object an adapter was loaded with, its extra config keys and user metadata.
    Valid only while ``model.peft_config[name] is config`` (a re-created adapter drops it)."""

    config: LoraConfig
    extras: dict[str, Any]
    metadata: dict[str, Any]


@dataclass
class Plan:
    """A checked adapter, ready to apply: tensors by destination."""

    config: LoraConfig
    extras: dict[str, Any]
    metadata: dict[str, Any]
    variant: Optional[Variant]
    lora: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module path -> {param: tensor}
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # modules_to_save path -> state dict
    base: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)  # base biases / embeddings


def load_adapter(model: "LoraModel", path: PathLike, adapter_name: str = "default", *, replace: bool = False,
                 trainable: bool = False, strict: bool = False, allow_pickle: bool = False) -> None:
    """Add the adapter in `path` to `model` as `adapter_name` (not activated, like PEFT).

    With `replace`, an existing adapter of that name is replaced. When the new one has the same
    targets, ranks, variant and modules_to_save, its tensors are copied into the existing
    parameters (a hot swap: no module is rebuilt, so a ``torch.compile``'d model does not
    recompile unless the scaling changed); otherwise the old adapter is deleted and
    the new one built, staying active if the old one was. See `lorafit.load` for the other
    arguments.
    """
    check_new_name(model, adapter_name, replace)
    checked = plan(model.model, read_adapter_dir(path, allow_pickle=allow_pickle), trainable=trainable, strict=strict)
    if adapter_name not in model.peft_config:
        apply_new(model, adapter_name, checked)
    elif _fits(model, adapter_name, checked):
        _hot_swap(model, adapter_name, checked)
    else:
        active = model.active_adapters
        model.delete_adapter(adapter_name)
        apply_new(model, adapter_name, checked)
        if adapter_name in active:
            model.set_adapter(active)


def plan(root: nn.Module, adapter: AdapterDir, trainable: bool = False, strict: bool = False) -> Plan:
    """Check `adapter` against the base model `root` (which may already hold lorafit layers).
    A config that rewrites the base's structure (``layer_replication``) is checked on the
    rewritten model, which is put back as it was before returning."""
    config, extras = config_from_peft(adapter.config, where=str(adapter.config_file))
    undo = []
    try:
        undo = [u for u in (r.rewrite(config, root) for r in rewrites_of(config)) if u is not None]
        return _plan(root, adapter, config, extras, trainable, strict)
    except ConfigError as exc:
        raise AdapterFileError(f"{adapter.config_file}: {exc}") from None
    finally:
        for step in reversed(undo):
            step()


def _plan(root: nn.Module, adapter: AdapterDir, config: LoraConfig, extras: dict[str, Any], trainable: bool,
          strict: bool) -> Plan:
    if config.target_modules is None:
        raise AdapterFileError(f"{adapter.config_file}: neither target_modules nor target_parameters is set")
    config = config.replace(inference_mode=not trainable,
                            modules_to_save=_present_modules_to_save(root, config.modules_to_save))
    try:
        config = prepared_config(config, root)
        variant = selected_variant(config)
        targets = find_targets(root, config)
        check_targets(config, [(path, unwrapped(module)) for path, module in targets])
        others = [found for source in target_sources(config) for found in source.find(config, root)]
    except ConfigError as exc:  # TargetError included
        raise AdapterFileError(f"{adapter.config_file}: {exc}") from None
    result = Plan(config, extras, adapter.user_metadata, variant)
    remaining = dict(adapter.tensors)
    for path, module in targets:
        result.lora[path] = _take_lora_tensors(adapter, remaining, path, module, config, variant)
    for target in others:
        result.lora[target.path] = _take_source_tensors(adapter, remaining, target)
    for path, module in find_modules_to_save(root, config.modules_to_save or []):
        result.saved[path] = _take_saved_module(adapter, remaining, path, module)
    for key in list(remaining):
        lora_key = split_lora_key(key)
        if lora_key is not None and lora_key[0] in result.lora:
            kind = f"{variant.field} = {getattr(config, variant.field)!r}" if variant else "plain LoRA"
            variant_fields = ", ".join(v.field for v in extensions().variants)
            raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} is not part of a {kind} adapter on "
                                   f"{lora_key[0]!r} (do the variant settings ({variant_fields}) in "
                                   f"{adapter.config_file.name} match the file?)")
        tensor = remaining.pop(key)
        result.base.append((_base_parameter(adapter, root, config, key, tensor), tensor))
    _check_fingerprint(adapter, root, config, strict)
    return result


def records(model: "LoraModel") -> dict[str, FileRecord]:
    if RECORDS_ATTR not in model.__dict__:
        model.__dict__[RECORDS_ATTR] = {}
    return model.__dict__[RECORDS_ATTR]


def file_record(model: "LoraModel", adapter_name: str) -> Optional[FileRecord]:
    """What the adapter's file held beyond its config, if the adapter is still as loaded."""
    record = records(model).get(adapter_name)
    return record if record is not None and model.peft_config.get(adapter_name) is record.config else None


def loaded_metadata(model: "LoraModel", adapter_name: str = "default") -> dict[str, Any]:
    """The user metadata (e.g. ``{"labels": [...]}``) saved with `adapter_name`'s file, if any."""
    record = file_record(model, adapter_name)
    return dict(record.metadata) if record else {}


# -- checking ----------------------------------------------------------------------------------


def _present_modules_to_save(root: nn.Module, names: Optional[list[str]]) -> Optional[list[str]]:
    """The entries that match a module of `root`. PEFT adds task defaults (e.g. "classifier" and
    "score" for SEQ_CLS) that may match nothing; the tensors, checked later, are the ground truth."""
    present = []
    for name in dict.fromkeys(names or []):
        try:
            find_modules_to_save(root, [name])
        except TargetError:
            continue
        present.append(name)
    return present or None


def _take_lora_tensors(adapter: AdapterDir, remaining: dict[str, Tensor], path: str, module: nn.Module,
                       config: LoraConfig, variant: Optional[Variant]) -> dict[str, Tensor]:
    """Pop and check the tensors of the adapter on `module` against the shapes its parameters
    would have (`expected_shapes`; the model is not touched)."""
    base = unwrapped(module)
    r = config.rank_for(path)
    expected_all = expected_shapes(module, r, variant)
    names = tensor_keys(base, variant.weights if variant else LoraWeights)
    found = {}
    for param, expected in expected_all.items():
        key = f"{PREFIX}{path}.{names[param]}"
        if key not in remaining:
            raise AdapterFileError(f"{adapter.weights_file}: missing tensor {key!r} for module {path!r}, "
                                   f"which {adapter.config_file.name} targets")
        tensor = remaining.pop(key)
        if tuple(tensor.shape) != expected:
            raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} "
                                   f"{_shape_problem(param, tensor, expected, r, config, path, base)}")
        found[param] = tensor
    return found


def _take_source_tensors(adapter: AdapterDir, remaining: dict[str, Tensor], target: SourceTarget) -> dict[str, Tensor]:
    """Pop and check the tensors of a target named by target_parameters / trainable_token_indices."""
    found = {}
    for param, expected in target.shapes.items():
        key = f"{PREFIX}{target.path}.{target.keys[param]}"
        if key not in remaining:
            raise AdapterFileError(f"{adapter.weights_file}: missing tensor {key!r}, which "
                                   f"{adapter.config_file.name} targets")
        tensor = remaining.pop(key)
        if tuple(tensor.shape) != tuple(expected):
            raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} has shape {tuple(tensor.shape)}, but "
                                   f"{adapter.config_file.name} (r, rank_pattern, token indices) gives "
                                   f"{target.path!r} the shape {tuple(expected)}")
        found[param] = tensor
    return found


def expected_shapes(module: nn.Module, r: int, variant: Optional[Variant]) -> dict[str, tuple[int, ...]]:
    """{parameter: shape} of a rank-`r` adapter of `variant` on `module` (a base module or its
    LoRA layer), from the kind's factor shapes and the variant's parameters built on the meta
    device (no memory, no initialisation)."""
    layer = module if isinstance(module, LoraLayer) else find_kind(module).wrap(module)
    a_shape, b_shape = layer.factor_shapes(r)
    cls = variant.weights if variant else LoraWeights
    probe = cls(torch.empty(a_shape, device="meta"), torch.empty(b_shape, device="meta"), 1.0)
    return {name: tuple(p.shape) for name, p in probe.named_parameters()}


def _shape_problem(param: str, tensor: Tensor, expected: tuple[int, ...], r: int, config: LoraConfig, path: str,
                   base: nn.Module) -> str:
    rank_dim = {"A": 0, "B": 1}.get(param)
    same_ndim = tensor.dim() == len(expected) and rank_dim is not None
    if same_ndim and all(t == e for d, (t, e) in enumerate(zip(tensor.shape, expected)) if d != rank_dim):
        source = "rank_pattern" if r != config.r else "r"
        return (f"has rank {tensor.shape[rank_dim]}, but adapter_config.json gives {path!r} rank {r} "
                f"(from {source})")
    return (f"has shape {tuple(tensor.shape)}, which does not fit module {path!r} ({type(base).__name__} "
            f"with weight {tuple(base.weight.shape)}): expected {expected} for rank {r}")


def _take_saved_module(adapter: AdapterDir, remaining: dict[str, Tensor], path: str,
                       module: nn.Module) -> dict[str, Tensor]:
    """Pop the state of a modules_to_save copy. PEFT stores it under the module's own path
    (``P.weight``); older PEFT versions under ``P.modules_to_save.weight``, also accepted.
    Copies of the frozen original (``P.original_module.*``, written with bias="all") are unused."""
    original = module.original_module if isinstance(module, ModulesToSave) else module
    state = {}
    for name, expected in original.state_dict().items():
        keys = [k for k in (f"{PREFIX}{path}.{name}", f"{PREFIX}{path}.modules_to_save.{name}") if k in remaining]
        if not keys:
            raise AdapterFileError(f"{adapter.weights_file}: missing tensor '{PREFIX}{path}.{name}' of module "
                                   f"{path!r}, listed in modules_to_save")
        key = keys[0]
        tensor = remaining.pop(key)
        for duplicate in keys[1:]:  # PEFT with bias="all" writes a copy's bias under both names
            del remaining[duplicate]
        if tensor.shape != expected.shape:
            raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} has shape {tuple(tensor.shape)}, but "
                                   f"{path}.{name} has shape {tuple(expected.shape)}")
        state[name] = tensor
    for key in [k for k in remaining if k.startswith(f"{PREFIX}{path}.original_module.")]:
        del remaining[key]
    return state


def _base_parameter(adapter: AdapterDir, root: nn.Module, config: LoraConfig, key: str,
                    tensor: Tensor) -> nn.Parameter:
    """The base parameter a non-LoRA tensor goes to: a bias (bias="all"/"lora_only") or an
    embedding matrix (PEFT saves those when an embedding is targeted). Anything else is refused."""
    lora_key = split_lora_key(key)
    path, _, leaf = strip_prefix(key).rpartition(".")
    if path.endswith(".base_layer") or path == "base_layer":
        path = path[: -len("base_layer")].rstrip(".")
    module = _module_at(root, path)
    if isinstance(module, LoraLayer):
        module = module.base_layer
    param = getattr(module, leaf, None) if module is not None else None
    embedding = isinstance(module, nn.Embedding) or module in _embedding_modules(root)
    if lora_key is not None or not isinstance(param, nn.Parameter) or not (leaf == "bias" or embedding):
        raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} matches no module "
                               f"{_why_unmatched(root, config, lora_key[0] if lora_key else path)}")
    if tensor.shape != param.shape:
        raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} has shape {tuple(tensor.shape)}, but "
                               f"{path}.{leaf} has shape {tuple(param.shape)}")
    return param


def _why_unmatched(root: nn.Module, config: LoraConfig, path: str) -> str:
    name = type(root).__name__
    if _module_at(root, path) is None:
        return f"({path!r} is not a module of {name})"
    return (f"the adapter config selects ({path!r} exists in {name}, but neither target_modules="
            f"{config.target_modules!r} with its filters nor modules_to_save={config.modules_to_save!r} selects it)")


def _module_at(root: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _embedding_modules(root: nn.Module) -> list[nn.Module]:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(root, getter, lambda: None)()
        found.append(module.base_layer if isinstance(module, LoraLayer) else module)
    return [m for m in found if m is not None]


def _check_fingerprint(adapter: AdapterDir, root: nn.Module, config: LoraConfig, strict: bool) -> None:
    """Compare with the saved fingerprint. Adapters whose initialisation rewrites the base
    (PiSSA, OLoRA: `InitScheme.rewrites_base`) were saved over the rewritten base, and loading
    rewrites it again, so only their shapes are compared."""
    saved = adapter.fingerprint
    if not saved:
        return
    current = fp.fingerprint(root, fp.fingerprinted_paths(root, config))
    if find_init(config.init_lora_weights).rewrites_base:
        current["sample_sha256"] = None
    found = fp.differences(saved, current)
    if found:
        message = f"{adapter.weights_file}: base model fingerprint does not match: {'; '.join(found)}"
        if strict:
            raise fp.BaseModelMismatch(message)
        warnings.warn(message + " (strict=True makes this an error)", AdapterFileWarning, stacklevel=4)


# -- applying ----------------------------------------------------------------------------------


def check_new_name(model: "LoraModel", name: str, replace: bool) -> None:
    """AdapterError unless `name` is free (or may be replaced) and not merged."""
    if name in model.peft_config and not replace:
        raise AdapterError(f"an adapter named {name!r} already exists; pass replace=True to replace it, "
                           f"or choose another adapter_name")
    if name in model.merged_adapters:
        raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge() before replacing it")


def apply_new(model: "LoraModel", name: str, checked: Plan) -> None:
    """Add the checked adapter `name` to `model` (steps that cannot fail on the file's account)."""
    model.add_adapter(name, checked.config)
    config = model.peft_config[name]
    with torch.no_grad():
        for path, tensors in checked.lora.items():
            holder = model.model.get_submodule(path)  # a target source's may be a modules_to_save copy
            weights = holder.modules_to_save[name] if isinstance(holder, ModulesToSave) else holder.lora[name]
            for param, tensor in tensors.items():
                weights.get_parameter(param).copy_(tensor)
        _copy_shared(model, name, checked)
    records(model)[name] = FileRecord(config, checked.extras, checked.metadata)


def _fits(model: "LoraModel", name: str, checked: Plan) -> bool:
    """Whether `checked` can replace adapter `name` in place: same modules, variant and shapes."""
    layers = {path: layer.lora[name] for path, layer in model.lora_layers() if name in layer.lora}
    copies = {path for path, w in model.wrappers() if isinstance(w, ModulesToSave) and name in w.modules_to_save}
    if set(layers) != set(checked.lora) or copies != set(checked.saved):
        return False
    cls = checked.variant.weights if checked.variant else LoraWeights
    return all(type(weights) is cls and all(weights.get_parameter(p).shape == t.shape
                                            for p, t in checked.lora[path].items())
               for path, weights in layers.items())


def _hot_swap(model: "LoraModel", name: str, checked: Plan) -> None:
    """Copy into the existing parameters and take the file's scaling and dropout rate (a
    ``torch.compile``'d model recompiles only if the scaling changed)."""
    with torch.no_grad():
        for path, tensors in checked.lora.items():
            weights = model.model.get_submodule(path).lora[name]
            for param, tensor in tensors.items():
                weights.get_parameter(param).copy_(tensor)
            weights.scaling = checked.config.scaling_for(path)
            weights.dropout_p = checked.config.lora_dropout
        _copy_shared(model, name, checked)
    model.peft_config[name] = checked.config
    records(model)[name] = FileRecord(checked.config, checked.extras, checked.metadata)
    if model.active_adapters:
        model.set_adapter(model.active_adapters)  # refreshes requires_grad for the new inference_mode


def _copy_shared(model: "LoraModel", name: str, checked: Plan) -> None:
    for path, state in checked.saved.items():
        model.model.get_submodule(path).modules_to_save[name].load_state_dict(state)
    for param, tensor in checked.base:
        param.copy_(tensor)
