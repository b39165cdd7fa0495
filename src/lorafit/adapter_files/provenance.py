"""How the base model an adapter was trained on was held: its dtype and quantisation.

`save_adapter` records both in the weights file's metadata (``base_dtype``, ``quantization``);
the commands that load an adapter for inference (generate, eval, serve, merge) read them back
here, so they load the base as it was trained unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..dtypes import dtype_choice
from .reading import AdapterDir


@dataclass(frozen=True)
class TrainedBase:
    """``dtype``: the short dtype name (``bf16``...) or None when not recorded; ``quantization``:
    the `lorafit.quant.describe_quantization` record, or None for a full-precision base."""

    dtype: Optional[str]
    quantization: Optional[dict[str, Any]]


def trained_base(adapter: AdapterDir) -> TrainedBase:
    metadata = adapter.user_metadata
    dtype = metadata.get("base_dtype")
    return TrainedBase(dtype_choice(dtype, f"{adapter.weights_file}: base_dtype") if dtype else None,
                       metadata.get("quantization") or None)


def inference_dtype(requested: str, adapters: list[AdapterDir]) -> str:
    """`requested` unless it is ``auto``; then the dtype the adapters were trained with when they
    all agree, else ``auto`` (the command's own default)."""
    if requested != "auto":
        return requested
    recorded = {trained_base(a).dtype for a in adapters}
    return recorded.pop() if len(recorded) == 1 and None not in recorded else "auto"


def label_config(labels: list[str]) -> dict[str, Any]:
    """The transformers config entries of a classifier with these label names, in class order
    (saved with an adapter as ``metadata={"labels": [...]}``)."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}
