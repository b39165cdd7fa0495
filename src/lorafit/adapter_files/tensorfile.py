"""Tensor bytes and safetensors files with torch alone (numpy is an optional dependency of torch).

`safetensors.torch.save_file` and ``Tensor.numpy()`` need numpy, which the core does not
install, so lorafit writes the safetensors format itself; reading goes through
``safetensors.safe_open``, which needs no numpy. The format (github.com/huggingface/safetensors):

    [8 bytes: N, little-endian u64][N bytes: JSON header, space-padded][data buffer]

The header maps each tensor name to ``{"dtype": "F32", "shape": [...], "data_offsets": [b, e]}``
(byte range in the data buffer; the ranges tile the buffer without gaps) and ``"__metadata__"``
to a ``{str: str}`` map. Data is row-major, little-endian (the byte order of every platform
torch ships for; a big-endian host is refused).
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..errors import AdapterFileError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
HEADER_ALIGN = 8


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of `tensor` in row-major order (``numel · element_size`` of them), copied
    from a contiguous CPU copy through ctypes."""
    flat = tensor.detach().cpu().contiguous()
    size = flat.numel() * flat.element_size()
    return ctypes.string_at(flat.data_ptr(), size) if size else b""


def write_safetensors(path: Union[str, Path], tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `tensors` and string `metadata` to `path` in the safetensors format, in key order."""
    if sys.byteorder != "little":
        raise AdapterFileError(f"{path}: lorafit writes safetensors files on little-endian hosts only")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.dtype not in DTYPE_NAMES:
            raise AdapterFileError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, which lorafit cannot write; "
                                   f"expected one of {sorted(str(d).removeprefix('torch.') for d in DTYPE_NAMES)}")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGN)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for key in sorted(tensors):
            handle.write(tensor_bytes(tensors[key]))
