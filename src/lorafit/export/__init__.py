"""Exporting trained adapters: merged Hugging Face model directories, GGUF files for other runtimes,
and adapter directories combined from several (`export_combined`, ``lorafit combine``).

    from lorafit.export import to_gguf, adapter_to_gguf
    to_gguf(lora_model.merge_and_unload(), "model.gguf", tokenizer, outtype="q8_0")  # + Modelfile
    adapter_to_gguf(lora_model, "adapter.gguf")                                      # llama.cpp --lora

Names are imported on first use, so ``import lorafit.export`` needs no optional dependency
(GGUF export needs ``pip install 'lorafit[export]'``).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
EXPORTS = {
    "to_gguf": "gguf",
    "adapter_to_gguf": "gguf",
    "export_gguf": "gguf",
    "rope_permute": "gguf",
    "ARCHITECTURES": "gguf",
    "OUTTYPES": "gguf",
    "export_merged": "merged",
    "export_combined": "combined",
}

__all__ = list(EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{EXPORTS[name]}"), name)
