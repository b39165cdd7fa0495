"""A new adapter directory combined from several adapters of one base model (``lorafit combine``):
the base and adapters are loaded from their directories, `lorafit.combine` makes the new adapter,
and its file records how it was made (``lorafit inspect`` shows it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..adapter_files import read_adapter_dir
from ..atomic import PathLike
from ..combine import METADATA_KEY, CombineReport, check_options
from ..errors import AdapterFileError, ConfigError
from ..model import LoraModel
from .merged import model_class

NAME = re.compile(r"[A-Za-z0-9_-]+")  # the adapter names LoraModel accepts
RESULT = "combined"  # the new adapter's name inside the model (the saved directory has none)


def export_combined(base: str, adapters: Sequence[str], out: PathLike, weights: Optional[Sequence[float]] = None,
                    method: str = "cat", rank: Optional[int] = None, density: Optional[float] = None,
                    majority_sign_method: str = "total", seed: Optional[int] = None,
                    allow_pickle: bool = False) -> CombineReport:
    """Combine the adapters in the directories (or Hub ids) `adapters`, all trained on `base`,
    with `weights` (one per adapter, 1 each when None; negative subtracts) by `method` (see
    `lorafit.combine.combine` for the methods and their rank / density / sign / seed settings),
    and save the result as a new adapter directory `out`, which must not exist or be empty.

    The base is loaded in fp32 as the class the first adapter was saved on (`model_class`). The
    saved metadata is the returned report's (`CombineReport.as_metadata`) plus ``sources``: each
    adapter's name in the report -> its directory. Options are checked before anything loads.
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ConfigError(f"--weights has {len(weights)} values for {len(adapters)} --adapter directories")
    check_options(method, rank, density, majority_sign_method)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AdapterFileError(f"{target}: already exists and is not an empty directory; choose a new --out")
    import transformers

    names = adapter_names(adapters, reserved=RESULT)
    first = read_adapter_dir(adapters[0], allow_pickle=allow_pickle)
    base_class = model_class(transformers, first, transformers.AutoConfig.from_pretrained(base))
    model = LoraModel(base_class.from_pretrained(base, dtype=torch.float32))
    for name, source in zip(names, adapters):
        model.load_adapter(source, adapter_name=name, allow_pickle=allow_pickle)
    report = model.combine(dict(zip(names, weights)), name=RESULT, method=method, rank=rank, density=density,
                           majority_sign_method=majority_sign_method, seed=seed)
    metadata = report.as_metadata()
    metadata[METADATA_KEY]["sources"] = {name: str(source) for name, source in zip(names, adapters)}
    model.save_adapter(target, adapter_names=[RESULT], metadata=metadata)
    return report


def adapter_names(sources: Sequence[str], reserved: str) -> list[str]:
    """A distinct adapter name per source: its folder name where that is a valid name, unused and
    not `reserved`, else ``adapterN`` (N its position, from 1)."""
    names: list[str] = []
    for i, source in enumerate(sources, 1):
        folder = Path(str(source).rstrip("/")).name
        usable = NAME.fullmatch(folder) and folder not in names and folder != reserved
        names.append(folder if usable else f"adapter{i}")
    return names
