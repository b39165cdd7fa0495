"""Crash-safe file writes: a reader sees the old file or the new one, never a torn mix.

Each file is written to a temporary sibling (same directory, so the same filesystem), flushed
and fsync'ed, then moved over the target with `os.replace` (atomic on POSIX and Windows), and
finally the directory itself is fsync'ed so the rename survives a power cut. A crash at any
point leaves the previous file whole; at worst a ``.<name>.tmp-*`` file is left behind.

`atomic_write_files` writes several files as one step: all temporaries first, then the renames.
A crash *between* renames leaves some targets new and some old; callers that need the group to
read consistently record, in the file renamed first, what the others must contain (see
`lorafit.adapter_files.saving` for how an adapter directory does this).

The trainer uses the same helpers for checkpoints and for its "latest checkpoint" pointer.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]
Writer = Callable[[Path], None]


def atomic_write_files(files: Sequence[tuple[PathLike, Writer]]) -> None:
    """Write each ``(target, writer)``: ``writer(tmp)`` fills a temporary file, then all are renamed.

    The renames happen in the order given, after every temporary has been written and fsync'ed,
    so an error in any writer leaves every target untouched (and the temporaries are removed).
    """
    staged: list[tuple[Path, Path]] = []
    created: list[Path] = []
    try:
        for target, writer in files:
            target = Path(target)
            created += _make_dirs(target.parent)
            tmp = _temp_sibling(target)
            staged.append((tmp, target))
            writer(tmp)
            _fsync_file(tmp)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for done, (tmp, target) in enumerate(staged):
        try:
            os.replace(tmp, target)
        except OSError:
            for rest, _ in staged[done:]:
                rest.unlink(missing_ok=True)
            raise
    for directory in dict.fromkeys([*(d.parent for d in created), *(target.parent for _, target in staged)]):
        _fsync_dir(directory)


def atomic_write(path: PathLike, writer: Writer) -> None:
    """Atomically create or replace `path` with what ``writer(tmp_path)`` writes to `tmp_path`
    (e.g. ``lambda p: torch.save(state, p)`` or ``lambda p: safetensors.torch.save_file(t, p)``)."""
    atomic_write_files([(path, writer)])


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON (the layout PEFT and Hugging Face use)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged_directory(target: PathLike, replace: bool = False) -> Iterator[Path]:
    """A new directory beside `target` (``.<name>.tmp-*``) to fill inside the block. When the block
    ends normally its files are fsync'ed and it is renamed to `target` (replacing an existing
    `target` when `replace`, else only an empty one); when it raises, it is removed. `target`
    appears whole or not at all, with whatever wrote into it (``save_pretrained``...) on disk."""
    target = Path(target)
    _make_dirs(target.parent)
    staging = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        if target.exists():
            if replace:
                shutil.rmtree(target)
            else:
                target.rmdir()
        os.rename(staging, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_temp_file(path: PathLike) -> bool:
    """Whether `path` is a temporary left by an interrupted atomic write."""
    name = Path(path).name
    return name.startswith(".") and ".tmp-" in name


def _make_dirs(directory: Path) -> list[Path]:
    """Create `directory` and missing parents; returns the ones created (their parents' entries
    need an fsync too)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _temp_sibling(target: Path) -> Path:
    """A new empty file next to `target`, created with the usual permissions (0666 & ~umask),
    unlike `tempfile.mkstemp`'s 0600, so the renamed file is as readable as a plain write."""
    while True:
        tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist the directory entry (the rename). Not possible on Windows, where it is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
