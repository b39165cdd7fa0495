"""Reading an adapter directory without trusting it.

Nothing is unpickled unless the caller opts in (and then only through
``torch.load(weights_only=True)``). Every problem becomes an `AdapterFileError` that names the
file, and the tensor key where there is one. Reading never touches a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..atomic import is_temp_file
from ..errors import AdapterFileError
from .tensorfile import tensor_bytes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# Our safetensors metadata (PEFT ignores every key but "format").
META_VERSION = "lorafit.version"
META_CONFIG = "lorafit.config"
META_REPLACES = "lorafit.replaces_config_sha256"
META_CHECKSUM = "lorafit.tensors_sha256"
META_FINGERPRINT = "lorafit.fingerprint"
META_USER = "lorafit.metadata"


class AdapterFileWarning(UserWarning):
    """An adapter loads, but something about it deserves attention (e.g. another base model)."""


@dataclass
class AdapterDir:
    """What an adapter directory holds, read and checked but not yet applied to any model."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    weights_file: Path
    notes: list[str] = field(default_factory=list)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def fingerprint(self) -> Optional[dict[str, Any]]:
        return self._json_meta(META_FINGERPRINT)

    @property
    def user_metadata(self) -> dict[str, Any]:
        return self._json_meta(META_USER) or {}

    @property
    def lorafit_version(self) -> Optional[str]:
        return self.metadata.get(META_VERSION)

    def _json_meta(self, key: str) -> Any:
        text = self.metadata.get(key)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise AdapterFileError(f"{self.weights_file}: metadata {key!r} is not valid JSON") from None


def read_adapter_dir(path: Union[str, os.PathLike], allow_pickle: bool = False) -> AdapterDir:
    """Read and check `path`: config JSON, weights (safetensors, or with `allow_pickle` a
    ``.bin`` through ``torch.load(weights_only=True)``), checksum and finiteness."""
    directory = Path(path)
    if directory.is_file() and directory.name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME):
        directory = directory.parent
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    weights_file = directory / WEIGHTS_NAME
    if weights_file.is_file():
        tensors, metadata = _read_safetensors(weights_file)
    elif (directory / PICKLE_NAME).is_file():
        weights_file = directory / PICKLE_NAME
        tensors, metadata = _read_pickle(weights_file, allow_pickle), {}
    else:
        raise AdapterFileError(f"{directory}: missing {WEIGHTS_NAME}{_subfolder_hint(directory)}")
    adapter = AdapterDir(directory, {}, tensors, metadata, weights_file)
    adapter.config = _read_config(adapter)
    _check_checksum(adapter)
    _check_finite(adapter)
    return adapter


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def leftover_temp_files(directory: Path) -> list[str]:
    """Temporaries left in `directory` by an interrupted save."""
    return sorted(p.name for p in directory.iterdir() if is_temp_file(p))


def _read_config(adapter: AdapterDir) -> dict[str, Any]:
    """The config object, recovering the one saved with the weights after an interrupted save.

    A lorafit save renames the weights file (which embeds the config text) before the config
    file. If the config file on disk is the one that save replaced, or is missing on a first
    save, the save was cut between the two renames and the embedded config is the right one.
    A config file that differs in any other way was edited after saving, and wins, as in PEFT.
    """
    file = adapter.config_file
    embedded = adapter.metadata.get(META_CONFIG)
    text = None
    if file.is_file():
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{file}: cannot be read ({exc})") from None
    replaced = adapter.metadata.get(META_REPLACES)
    interrupted = embedded is not None and text != embedded and (
        (text is None and replaced is None) or (text is not None and sha256_text(text) == replaced))
    if interrupted:
        adapter.notes.append(f"{CONFIG_NAME} was left from before an interrupted save; "
                             f"used the config stored with the weights")
        text = embedded
    if text is None:
        raise AdapterFileError(f"{adapter.path}: missing {CONFIG_NAME}{_subfolder_hint(adapter.path)}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{file}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except OSError as exc:
        raise AdapterFileError(f"{file}: cannot be read ({exc})") from None
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise AdapterFileError(f"{file}: truncated or corrupt safetensors file ({exc})") from None
    return tensors, metadata


def _read_pickle(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        safe = file.with_name(WEIGHTS_NAME)
        raise AdapterFileError(
            f"{file}: refusing to load a pickle file, which can run arbitrary code. If you trust it, convert it "
            f"once: python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('{file}', "
            f"weights_only=True), '{safe}', metadata={{'format': 'pt'}})\", or pass allow_pickle=True "
            f"(loads with torch.load(weights_only=True))")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{file}: cannot be loaded with torch.load(weights_only=True) ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterFileError(f"{file}: expected a mapping of tensor names to tensors")
    return state


def _check_checksum(adapter: AdapterDir) -> None:
    recorded = adapter.metadata.get(META_CHECKSUM)
    if recorded is not None and tensors_checksum(adapter.tensors) != recorded:
        raise AdapterFileError(f"{adapter.weights_file}: tensor contents do not match the checksum recorded when "
                               f"it was saved; the file is corrupt")


def _check_finite(adapter: AdapterDir) -> None:
    for key, tensor in adapter.tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} holds {bad} NaN/Inf "
                                       f"value{'s' if bad > 1 else ''}")


def _subfolder_hint(directory: Path) -> str:
    found = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file()) if directory.is_dir() else []
    return f"; it holds adapters in subfolders {', '.join(found)}: pass one of those" if found else ""
