"""Reading an adapter directory without trusting it.

Nothing is unpickled unless the caller opts in (and then only through
``torch.load(weights_only=True)``). Every problem becomes an `AdapterFileError` that names the
file, and the tensor key where there is one. Reading never touches a model.

A path that is not a local directory but looks like a Hugging Face Hub id (``org/name``) is
fetched with ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_CACHE``/``HF_HOME`` and
``HF_HUB_OFFLINE`` apply); a local directory of that name wins, as in PEFT.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..atomic import is_temp_file
from ..errors import AdapterFileError
from .keys import split_lora_key
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

# PEFT's suffixes of the LoRA factors: A [r, in(, *kernel)] and B [out, r(, 1, …)]
FACTOR_SUFFIXES = {"lora_A.weight": "A", "lora_embedding_A": "A", "lora_B.weight": "B", "lora_embedding_B": "B"}
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, f"*/{CONFIG_NAME}", f"*/{WEIGHTS_NAME}"]
HUB_EXTRA = "pip install 'lorafit[train]' (or pip install huggingface_hub)"


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
    """Read and check `path` (a directory, one of its two files, or a Hub id): config JSON,
    weights (safetensors, or with `allow_pickle` a ``.bin`` through
    ``torch.load(weights_only=True)``), checksum, dtypes and finiteness."""
    directory = resolve_adapter_path(path, allow_pickle)
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
    _check_values(adapter)
    return adapter


def resolve_adapter_path(path: Union[str, os.PathLike], allow_pickle: bool = False) -> Path:
    """`path` itself when it exists here or is not shaped like a Hub id; else the local snapshot
    of Hub repo `path` (downloaded, or from the cache when offline). Only the adapter files
    (`HUB_FILES`, and ``adapter_model.bin`` with `allow_pickle`) are fetched."""
    local = Path(path)
    if local.exists() or not HUB_ID.fullmatch(str(path)):
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AdapterFileError(f"{path}: no such local directory, and loading it from the Hugging Face Hub needs "
                               f"huggingface_hub: {HUB_EXTRA}") from None
    patterns = HUB_FILES + ([PICKLE_NAME, f"*/{PICKLE_NAME}"] if allow_pickle else [])
    try:
        return Path(snapshot_download(str(path), allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub's errors (offline cache miss, unknown repo, network) share no base
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterFileError(f"{path}: no such local directory, and the Hugging Face Hub repo could not be "
                               f"fetched: {reason}") from None
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
    """The checksum covers what was saved: a mismatch means the file changed afterwards. Factor
    shapes that disagree with each other or with the recorded base weights are named too."""
    recorded = adapter.metadata.get(META_CHECKSUM)
    if recorded is not None and tensors_checksum(adapter.tensors) != recorded:
        shapes = "".join(f"; {problem}" for problem in shape_problems(adapter))
        raise AdapterFileError(f"{adapter.weights_file}: tensor contents do not match the checksum recorded when "
                               f"it was saved; the file was changed after saving (corrupt){shapes}")


def _check_values(adapter: AdapterDir) -> None:
    """LoRA factors must be floating point (an integer tensor is refused, never cast); every
    floating-point tensor must be finite."""
    for key, tensor in adapter.tensors.items():
        if not tensor.is_floating_point():
            if split_lora_key(key) is not None:
                raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} has dtype "
                                       f"{str(tensor.dtype).removeprefix('torch.')}; LoRA tensors must be floating "
                                       f"point (float32, bfloat16, float16)")
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterFileError(f"{adapter.weights_file}: tensor {key!r} holds {bad} NaN/Inf "
                                   f"value{'s' if bad > 1 else ''}")


def lora_factors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """{module path: {"A" / "B": (key, tensor)}} for the LoRA factors among `tensors`."""
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        split = split_lora_key(key)
        if split is not None and split[1] in FACTOR_SUFFIXES:
            factors.setdefault(split[0], {})[FACTOR_SUFFIXES[split[1]]] = (key, tensor)
    return factors


def shape_problems(adapter: AdapterDir, rank_for: Optional[Callable[[str], int]] = None,
                   rank_why: Optional[Callable[[str], Optional[str]]] = None) -> list[str]:
    """Every LoRA factor whose shape is not the expected one, as ``"tensor K has shape S,
    expected E (why)"``.

    The rank is ``rank_for(module)`` (the config's) when given, else A and B must agree on it;
    ``rank_why(module)``, when given and not None, says where that rank comes from.
    The other sizes come from the base weight shape W recorded in lorafit's fingerprint, when
    there is one: ``A [r, *W[1:]]``, ``B [W[0], r, 1, …]``; for embeddings and fan_in_fan_out
    layers (W stored [in, out]) ``A [r, W[0]]``, ``B [W[1], r]``.
    """
    base_shapes = (adapter.fingerprint or {}).get("weights") or {}
    transposed_layers = bool(adapter.config.get("fan_in_fan_out"))
    problems = []
    for module, pair in sorted(lora_factors(adapter.tensors).items()):
        if len(pair) != 2:
            continue  # a missing partner is reported by the caller
        (a_key, A), (b_key, B) = pair["A"], pair["B"]
        if rank_for is None and A.shape[0] != B.shape[1]:
            problems.append(f"tensors {a_key!r} {tuple(A.shape)} and {b_key!r} {tuple(B.shape)} disagree on the "
                            f"rank (A's first size, B's second)")
            continue
        r = rank_for(module) if rank_for else A.shape[0]
        weight = base_shapes.get(module)
        transposed = transposed_layers or a_key.endswith("lora_embedding_A")
        expected = _expected_factor_shapes(A, B, r, weight, transposed)
        why = (rank_why and rank_why(module)) or (f"rank {r} from {CONFIG_NAME}" if rank_for else f"rank {r}")
        why += f", base weight {tuple(weight)} recorded in the fingerprint" if weight else ""
        for key, tensor, shape in ((a_key, A, expected[0]), (b_key, B, expected[1])):
            if tuple(tensor.shape) != shape:
                problems.append(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape} ({why})")
    return problems


def _expected_factor_shapes(A: torch.Tensor, B: torch.Tensor, r: int, weight: Optional[list[int]],
                            transposed: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if weight is None:  # sizes other than the rank are unknown: keep the file's
        return (r, *A.shape[1:]), (B.shape[0], r, *B.shape[2:])
    if transposed and len(weight) == 2:
        return (r, weight[0]), (weight[1], r)
    return (r, *weight[1:]), (weight[0], r, *[1] * (len(weight) - 2))


def _subfolder_hint(directory: Path) -> str:
    found = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file()) if directory.is_dir() else []
    return f"; it holds adapters in subfolders {', '.join(found)}: pass one of those" if found else ""
