"""safetensors_io against files torch writes (safetensors.torch) and torch's reader of ours."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lumos_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors


def _torch_tensors():
    g = torch.Generator().manual_seed(0)
    return {"w_bf16": torch.randn(6, 10, generator=g).to(torch.bfloat16),
            "w_f32": torch.randn(3, 4, 5, generator=g), "w_f16": torch.randn(7, generator=g).half(),
            "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4)}


def _bits(t: torch.Tensor) -> np.ndarray:
    """A torch tensor's raw bytes (numpy has no bf16: compare bit patterns)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else \
        t.view(torch.int16).numpy().tobytes()


def test_reads_torch_written_files_bit_exact_and_slices_lazily(tmp_path):
    ref = _torch_tensors()
    save_file(ref, tmp_path / "m.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert sorted(f.names) == sorted(ref) and f.metadata == {"format": "pt"}
    for name, t in ref.items():
        arr = np.asarray(f.array(name))
        assert f.shape(name) == tuple(t.shape) and arr.dtype == f.dtype(name)
        assert arr.tobytes() == _bits(t), name
    assert str(f.dtype("w_bf16")) == "bfloat16"
    full = np.asarray(f.array("w_f32"))
    lazy = f.array("w_f32")
    for index in [(slice(1, 3), slice(None), slice(0, 5, 2)), (2,), (Ellipsis, 1), (1, slice(2, 4))]:
        np.testing.assert_array_equal(lazy[index], full[index])
        np.testing.assert_array_equal(lazy.T[index], full.T[index])
    w = f.array("w_bf16")
    assert w.T.shape == (10, 6)
    np.testing.assert_array_equal(w.T[2:5, 1:3].view(np.int16), ref["w_bf16"].T[2:5, 1:3].contiguous()
                                  .view(torch.int16).numpy())


def test_written_files_read_back_bit_exact_by_torch(tmp_path):
    ref = _torch_tensors()
    save_file(ref, tmp_path / "src.safetensors")
    src = SafetensorsFile(tmp_path / "src.safetensors")
    write_safetensors(tmp_path / "out.safetensors", {n: np.asarray(src.array(n)) for n in src.names})
    back = load_file(tmp_path / "out.safetensors")
    assert sorted(back) == sorted(ref) and not list(tmp_path.glob(".*tmp*"))
    for name, t in ref.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with pytest.raises(ValueError, match="tensor c has unsupported dtype complex64"):
        write_safetensors(tmp_path / "bad.safetensors", {"c": np.zeros(2, np.complex64)})


def test_damaged_files_are_one_line_naming_the_file(tmp_path):
    save_file(_torch_tensors(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    for cut, tail in [(len(data) // 2, b""), (4, b""), (8, b"{not json")]:
        (tmp_path / "d.safetensors").write_bytes(data[:cut] + tail)
        with pytest.raises(ValueError) as e:
            SafetensorsFile(tmp_path / "d.safetensors")
        assert str(e.value).startswith(f"{tmp_path / 'd.safetensors'}: truncated or corrupt safetensors file")
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        SafetensorsFile(tmp_path / "none.safetensors")
