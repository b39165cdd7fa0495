"""Saving adapters in PEFT's format, crash-safely.

Each adapter directory gets ``adapter_model.safetensors`` and ``adapter_config.json``, written
with `lorafit.atomic.atomic_write_files`: both temporaries first, then the weights renamed into
place, then the config. A crash before the first rename leaves the old pair; after the second,
the new pair. A crash between the two leaves new weights beside the old config; the weights file
embeds the config it belongs with and the SHA-256 of the config file it replaced, so the reader
(`reading._read_config`) recognises the stale config and uses the embedded one: every crash
point loads as either the old adapter or the new one, never a mix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from torch import Tensor

from ..atomic import PathLike, atomic_write_files
from ..errors import AdapterError, AdapterFileError
from ..layers import ModulesToSave
from ..quant import describe_quantization, float_dtype
from ..version import __version__
from . import fingerprints as fp
from .keys import PREFIX, tensor_keys
from .loading import file_record
from .peft_config import config_to_peft
from .tensorfile import write_safetensors
from .reading import (CONFIG_NAME, META_CHECKSUM, META_CONFIG, META_FINGERPRINT, META_REPLACES, META_USER,
                      META_VERSION, WEIGHTS_NAME, sha256_text, tensors_checksum)

if TYPE_CHECKING:
    from ..model import LoraModel


def save_adapter(model: "LoraModel", path: PathLike, adapter_names: Optional[Sequence[str]] = None, *,
                 metadata: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """Save adapters of `model` under `path` in PEFT's format; returns the directories written.

    `adapter_names` defaults to every adapter. A single adapter is written to `path` itself;
    with several, "default" goes to `path` and each other one to ``path/<name>`` (PEFT's layout;
    PEFT also puts a lone non-default adapter in a subfolder). `metadata` is JSON-serialisable
    data stored in the safetensors header, merged over any metadata the adapter was loaded with;
    by convention ``{"labels": [...]}`` holds a classifier's label names in class-index order
    (`lorafit merge` turns them into ``id2label``). A quantised base is recorded as
    ``{"quantization": describe_quantization(model)}`` (`lorafit merge` rounds the base alike), and
    the base's dtype as ``{"base_dtype": "bfloat16"}``: commands that load an adapter for inference
    load the base as it was trained (`lorafit.adapter_files.trained_base`).
    Read it back with `loaded_metadata` or `read_adapter_dir(path).user_metadata`.
    """
    names = list(model.adapter_names if adapter_names is None else adapter_names)
    if not names:
        raise AdapterError("the model has no adapter to save")
    for name in names:
        if name not in model.peft_config:
            raise AdapterError(f"unknown adapter {name!r}; this model has {model.adapter_names}")
    root = Path(path)
    directories = {name: root if len(names) == 1 or name == "default" else root / name for name in names}
    for name, directory in directories.items():
        _save_one(model, name, directory, metadata)
    return list(directories.values())


def _save_one(model: "LoraModel", name: str, directory: Path, metadata: Optional[Mapping[str, Any]]) -> None:
    config = model.peft_config[name]
    record = file_record(model, name)
    tensors = _adapter_tensors(model, name)
    overrides: dict[str, Any] = {
        "base_model_name_or_path": config.base_model_name_or_path or getattr(model.model, "name_or_path", None) or None,
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for _, layer in model.lora_layers()
                              if name in layer.lora),
    }
    extras = record.extras if record else {}
    if config.task_type is None and "auto_mapping" not in extras:
        cls = type(model.model)
        overrides["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    config_text = json.dumps(config_to_peft(config, extras, **overrides), indent=2, sort_keys=True)
    quantization = describe_quantization(model.model)
    trained_on = {"base_dtype": str(float_dtype(model.model)).removeprefix("torch.")}
    if quantization:
        trained_on["quantization"] = quantization
    user = {**trained_on, **(record.metadata if record else {}),
            **(metadata or {})}
    try:
        user_text = json.dumps(user, sort_keys=True) if user else None
    except TypeError as exc:
        raise AdapterFileError(f"metadata for {directory / WEIGHTS_NAME} is not JSON-serialisable ({exc})") from None
    header = {
        "format": "pt",
        META_VERSION: __version__,
        META_CONFIG: config_text,
        META_CHECKSUM: tensors_checksum(tensors),
        META_FINGERPRINT: json.dumps(fp.fingerprint(model.model, fp.fingerprinted_paths(model.model, config)), sort_keys=True),
    }
    previous = directory / CONFIG_NAME
    if previous.is_file():
        old_text = previous.read_text(encoding="utf-8", errors="replace")
        if old_text != config_text:
            header[META_REPLACES] = sha256_text(old_text)
    if user_text:
        header[META_USER] = user_text

    def write_weights(tmp: Path) -> None:
        write_safetensors(tmp, tensors, header)

    try:
        atomic_write_files([(directory / WEIGHTS_NAME, write_weights),
                            (directory / CONFIG_NAME, lambda tmp: tmp.write_text(config_text, encoding="utf-8"))])
    except OSError as exc:
        raise AdapterFileError(f"{directory}: cannot write the adapter ({exc})") from None


def _adapter_tensors(model: "LoraModel", name: str) -> dict[str, Tensor]:
    """PEFT-named CPU copies of adapter `name`'s tensors."""
    config = model.peft_config[name]
    tensors: dict[str, Tensor] = {}
    for path, layer in model.lora_layers():
        if name not in layer.lora:
            continue
        weights = layer.lora[name]
        names = tensor_keys(layer, type(weights))
        for param, value in weights.named_parameters():
            if param not in names:
                raise AdapterFileError(f"cannot save {type(weights).__name__}.{param}: it has no name in the adapter "
                                       f"file format; name it in the variant's record (Variant.tensor_keys)")
            tensors[f"{PREFIX}{path}.{names[param]}"] = _cpu_copy(value)
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            tensors[f"{PREFIX}{path}.base_layer.bias"] = _cpu_copy(layer.base_layer.bias)
    for path, wrapper in model.wrappers():
        if isinstance(wrapper, ModulesToSave) and name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict().items():
                tensors[f"{PREFIX}{path}.{key}"] = _cpu_copy(value)
    if config.bias == "all":
        for key, value in model.model.named_parameters():
            inside_copy = ".modules_to_save." in f".{key}" or ".original_module." in f".{key}"
            if key.rpartition(".")[2] == "bias" and not inside_copy and ".lora." not in f".{key}":
                tensors[f"{PREFIX}{key}"] = _cpu_copy(value)
    return tensors


def _cpu_copy(tensor: Tensor) -> Tensor:
    """A contiguous CPU copy sharing no storage (safetensors refuses shared tensors)."""
    return tensor.detach().to("cpu", copy=True).contiguous()
