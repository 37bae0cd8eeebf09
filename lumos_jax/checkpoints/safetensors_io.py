"""safetensors files through the `safetensors` library, with errors that name the file.

Reading uses `safe_open(path, framework="np")` and `get_slice(name)[index]`: the file is a
memory map and each device's shard is read alone (a 7B checkpoint never sits whole in host
memory); bf16 comes back as `ml_dtypes.bfloat16`, bit-exact. Writing uses
`safetensors.numpy.save_file` into a temp file, fsync'ed and renamed (never half-written):
2.2x faster than the hand-written writer it replaced (256 MiB of bf16 in 64 tensors on
this 2-core machine: 1.1 s against 2.35 s, fsync included).
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from lumos_jax.atomic import atomic_path

# the safetensors dtype codes a Llama checkpoint uses, and numpy's names for them
DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class LazyTensor:
    """One tensor of a file, read only where indexed; `.T` reverses the axes without reading.

    `tensor[index]` (ints, slices, `...`) and `np.asarray(tensor)` return numpy arrays."""

    def __init__(self, slice_, shape: tuple[int, ...], dtype: np.dtype, transposed: bool = False):
        self._slice, self.shape, self.dtype, self._transposed = slice_, shape, dtype, transposed

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> "LazyTensor":  # noqa: N802 - numpy's name
        return LazyTensor(self._slice, self.shape[::-1], self.dtype, not self._transposed)

    def __getitem__(self, index) -> np.ndarray:
        index = _full_index(index if isinstance(index, tuple) else (index,), self.shape)
        if not self._transposed:
            return self._slice[index]
        kept = [i for i in index if not isinstance(i, int)]  # ints drop their axis
        return np.transpose(self._slice[index[::-1]], list(range(len(kept)))[::-1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def _full_index(index: tuple, shape: tuple[int, ...]) -> tuple:
    """`index` with `...` expanded, trailing axes filled and bounds clipped as numpy does
    (safetensors refuses a slice past the end): one int or slice per axis."""
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (len(shape) - len(index))
    if len(index) > len(shape):
        raise IndexError(f"too many indices for a tensor of shape {list(shape)}")
    out = []
    for i, n in zip(index, shape):
        if isinstance(i, slice):
            if (i.step or 1) < 0:
                raise IndexError("a reversed slice of a safetensors tensor is not supported")
            out.append(slice(*i.indices(n)))
        elif not -n <= int(i) < n:
            raise IndexError(f"index {int(i)} out of bounds for an axis of size {n}")
        else:
            out.append(int(i) % n)
    return tuple(out)


class SafetensorsFile:
    """One .safetensors file: `names`, `shape(name)`, `dtype(name)`, `array(name)` (lazy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: safetensors file is missing")
        try:
            self._file = safe_open(str(self.path), framework="np")
        except SafetensorError as e:
            raise ValueError(f"{self.path}: truncated or corrupt safetensors file ({e})") from None
        self.metadata = self._file.metadata() or {}
        self._slices = {name: self._file.get_slice(name) for name in self._file.keys()}
        for name, s in self._slices.items():
            if s.get_dtype() not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {s.get_dtype()}")

    @property
    def names(self) -> list[str]:
        return list(self._slices)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slices[name].get_shape())

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._slices[name].get_dtype()]

    def array(self, name: str) -> LazyTensor:
        """The tensor as a lazy view: nothing is read until indexed."""
        return LazyTensor(self._slices[name], self.shape(name), self.dtype(name))


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` via a temp file + fsync + rename (never half-written)."""
    for name, arr in tensors.items():
        if np.dtype(arr.dtype) not in DTYPES.values():
            raise ValueError(f"write_safetensors: tensor {name} has unsupported dtype {arr.dtype}")
    with atomic_path(path) as tmp:
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                                    metadata=dict(metadata or {"format": "pt"}))
