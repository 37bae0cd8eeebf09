"""Minimal safetensors reader/writer over numpy memory maps.

Why our own: loading must not materialise a whole 7B checkpoint on the host (each
device reads only its shard straight from the memory map), bf16 must round-trip
bit-exactly (numpy has no bfloat16; ml_dtypes does), and every defect — truncated
file, bad header, missing tensor — must name the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazy view of one .safetensors file: `names`, `shape(name)`, `array(name)` (a memmap)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: safetensors file is missing")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise ValueError(f"{self.path}: truncated safetensors file (header says "
                                 f"{header_len} bytes, file has {size})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{self.path}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries = header
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e.get('dtype')}")
            begin, end = e["data_offsets"]
            expected = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != expected:
                raise ValueError(f"{self.path}: tensor {name} has {end - begin} bytes, shape "
                                 f"{e['shape']} needs {expected}")
            if self._data_start + end > size:
                raise ValueError(f"{self.path}: truncated safetensors file (tensor {name} ends at "
                                 f"byte {self._data_start + end}, file has {size})")
        self._mmap = None

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only memmap view: nothing is read until sliced."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self._entries[name]
        begin, end = e["data_offsets"]
        buf = self._mmap[self._data_start + begin: self._data_start + end]
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (name order kept) to `path` via a temp file + rename (never half-written)."""
    path = Path(path)
    header, offset = {}, 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise ValueError(f"write_safetensors: tensor {name} has unsupported dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section like the reference writer
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
