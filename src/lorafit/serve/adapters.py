"""The adapters a server knows by name, the few it keeps in memory, and the ones in use.

Names come from the subfolders of the adapter directory (each holding an ``adapter_config.json``)
and from run-time registrations. An adapter is loaded into the model on first use; at most
`capacity` stay loaded, and the least recently used idle one makes room for the next. An adapter
that a running request still uses is never unloaded under it.

Every method except `names` and `path` changes the model, so only the engine thread calls them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from ..adapter_files import plan, read_adapter_dir
from ..adapter_files.fingerprints import BaseModelMismatch
from ..config import is_default
from ..errors import AdapterError, AdapterFileError
from ..registry import extensions

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # the names LoraModel accepts


def check_adapter_name(name: str, reserved: tuple[str, ...] = ()) -> str:
    """Return `name` if it is a safe adapter name, else raise `AdapterError`.

    A name is 1-64 letters, digits, ``_`` and ``-``, not starting with ``-``: it can hold no path
    separator and no ``..``, so it can never point outside a directory.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-' "
            "(no path separators, no '.')"
        )
    if name in reserved:
        raise AdapterError(f"adapter name {name!r} is reserved for the base model")
    return name


def discover(directory: Path, reserved: tuple[str, ...] = ()) -> dict[str, Path]:
    """Adapters in `directory`: each subfolder holding an adapter config, by folder name."""
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {str(directory)!r} does not exist")
    found = {}
    for sub in sorted(directory.iterdir()):
        if not (sub / CONFIG_FILE).is_file():
            continue
        try:
            found[check_adapter_name(sub.name, reserved)] = sub
        except AdapterError as exc:
            log.warning("skipping %s: %s", sub, exc)
    return found


class UnknownAdapter(AdapterError):
    """No adapter of that name is registered."""


class AdapterExists(AdapterError):
    """An adapter of that name is already registered (or still unloading)."""


class SlotsBusy(AdapterError):
    """Every adapter slot holds an adapter that a running request uses."""


class AdapterPool:
    """Known adapters (name -> directory) and an LRU of at most `capacity` loaded into `model`.

    `model` is a `lorafit.LoraModel` (`load_adapter`, `delete_adapter`). An adapter whose saved
    base-model fingerprint differs from `model` is refused (`BaseModelMismatch`: at start-up
    through `refuse_other_bases`, a 400 for a request that loads it) unless `allow_base_mismatch`,
    when it loads with a warning.
    """

    def __init__(self, model, paths: dict[str, Path], capacity: int, reserved: tuple[str, ...] = (),
                 allow_base_mismatch: bool = False):
        if capacity < 1:
            raise AdapterError(f"max adapters must be at least 1, got {capacity}")
        self._model = model
        self._paths = dict(paths)
        self._lock = threading.Lock()  # guards _paths, read by the HTTP threads
        self.capacity = capacity
        self.reserved = reserved
        self.allow_base_mismatch = allow_base_mismatch
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._users: Counter[str] = Counter()
        self._unloading: set[str] = set()  # removed while in use: unload when the last user ends

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def path(self, name: str) -> Path | None:
        with self._lock:
            return self._paths.get(name)

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def refuse_other_bases(self) -> None:
        """Raise `BaseModelMismatch` naming every known adapter saved on another base model,
        checked as a strict load would be but without changing the model (``lorafit serve``
        calls this at start-up). Other problems are left to the load that meets them."""
        mismatched = []
        for name in self.names():
            try:
                plan(self._model.model, read_adapter_dir(self.path(name)), strict=True)
            except BaseModelMismatch as exc:
                mismatched.append(f"{name} ({exc})")
            except AdapterFileError:
                continue
        if mismatched:
            raise BaseModelMismatch(f"{len(mismatched)} adapter(s) were saved on another base model: "
                                    f"{'; '.join(mismatched)}; serving them needs --allow-base-mismatch")

    def acquire(self, name: str) -> None:
        """Make sure `name` is loaded and count one more user of it.

        Raises `AdapterError` for an unknown name, `SlotsBusy` when no slot can be freed now, and
        `AdapterFileError` when the adapter's files cannot be loaded.
        """
        path = self.path(name)
        if path is None:
            raise UnknownAdapter(f"unknown adapter {name!r}")
        if name not in self._loaded:
            self._make_room()
            self._load(name, path)
            self._loaded[name] = None
        self._loaded.move_to_end(name)
        self._users[name] += 1

    def release(self, name: str) -> None:
        """Count one user of `name` less; finish a pending unload when it was the last."""
        self._users[name] -= 1
        if self._users[name] <= 0:
            del self._users[name]
            if name in self._unloading:
                self._unload(name)

    def add(self, name: str, path: Path) -> None:
        """Register `path` as adapter `name` and load it now, so that a broken one is refused."""
        check_adapter_name(name, self.reserved)
        if self.path(name) is not None or name in self._unloading:
            raise AdapterExists(f"adapter {name!r} already exists; delete it first")
        if not (path / CONFIG_FILE).is_file():
            raise AdapterFileError(f"{str(path)!r} is not an adapter directory (no {CONFIG_FILE})")
        with self._lock:
            self._paths[name] = path
        try:
            self.acquire(name)
        except Exception:
            with self._lock:
                del self._paths[name]
            raise
        self.release(name)

    def remove(self, name: str) -> None:
        """Forget `name`; unload it now, or when the requests that use it have finished."""
        with self._lock:
            if self._paths.pop(name, None) is None:
                raise UnknownAdapter(f"unknown adapter {name!r}")
        if self._users[name]:
            self._unloading.add(name)
        elif name in self._loaded:
            self._unload(name)

    def _make_room(self) -> None:
        while len(self._loaded) >= self.capacity:
            idle = next((n for n in self._loaded if not self._users[n]), None)
            if idle is None:
                raise SlotsBusy(f"all {self.capacity} adapter slots are in use")
            self._unload(idle)

    def _load(self, name: str, path: Path) -> None:
        """Load the adapter; any failure leaves the model as it was and is an `AdapterFileError`.
        An adapter that rewrites the base's structure (``layer_replication``) is refused by name:
        every adapter of a server runs on one shared base."""
        try:
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}  # the load below names what is wrong with the file
        for rewrite in extensions().rewrites:
            if isinstance(config, dict) and not is_default(config.get(rewrite.field)):
                raise AdapterFileError(f"adapter {name!r} sets {rewrite.field} = {config[rewrite.field]!r}, which "
                                       "changes the base model's layers; lorafit serve runs all adapters on one "
                                       "shared base and refuses it (load it alone with lorafit.load)")
        try:
            self._model.load_adapter(str(path), adapter_name=name, strict=not self.allow_base_mismatch)
        except Exception as exc:
            if name in self._model.adapter_names:
                self._model.delete_adapter(name)
            if isinstance(exc, BaseModelMismatch):
                raise BaseModelMismatch(f"adapter {name!r} was saved on another base model: {exc}; serving it "
                                        f"needs lorafit serve --allow-base-mismatch") from None
            if isinstance(exc, AdapterFileError):
                raise
            raise AdapterFileError(f"adapter {name!r} could not be loaded from {str(path)!r}: {exc}") from exc

    def _unload(self, name: str) -> None:
        self._model.delete_adapter(name)
        self._loaded.pop(name, None)
        self._unloading.discard(name)
