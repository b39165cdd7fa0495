"""The weight dtypes every command accepts, in one table: short names (``fp32``, ``bf16``,
``fp16``, shown in help and written in configs) and torch's names (``float32``, ``bfloat16``,
``float16``) mean the same; ``auto`` leaves the choice to the command."""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch's spelling -> the short one
LONG_NAMES = {str(dtype).removeprefix("torch."): short for short, dtype in DTYPES.items()}
CHOICES = ("auto", *DTYPES)


def dtype_choice(name: str, where: str = "dtype") -> str:
    """``auto`` or the short name of `name`, given in either spelling; `where` names the option."""
    short = LONG_NAMES.get(name, name) if isinstance(name, str) else None
    if short not in CHOICES:
        raise ConfigError(f"{where}: {name!r} is not a dtype; expected one of {', '.join(CHOICES)} "
                          f"(or {', '.join(LONG_NAMES)})")
    return short


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for `name` in either spelling (not ``auto``)."""
    short = dtype_choice(name)
    if short == "auto":
        raise ConfigError("dtype: 'auto' has no torch dtype; resolve it first")
    return DTYPES[short]
