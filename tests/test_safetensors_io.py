"""Our numpy safetensors reader/writer against the safetensors library (the format's reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from r1v.converters.errors import CheckpointError
from r1v.converters.safetensors_io import MappedFile, bf16_to_f32, f32_to_bf16, read_header, write_safetensors


def test_reads_files_written_by_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)).to(torch.bfloat16),
        "b": torch.from_numpy(rng.standard_normal((7,)).astype(np.float16)),
        "c": torch.from_numpy(rng.standard_normal((2, 2, 2)).astype(np.float32)),
        "empty": torch.zeros((0, 4), dtype=torch.float32),
    }
    path = tmp_path / "ref.safetensors"
    torch_save_file(tensors, str(path), metadata={"format": "pt"})
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    mapped = MappedFile(path)
    for name, ref in tensors.items():
        ours = mapped.array(infos[name])
        assert ours.shape == tuple(ref.shape)
        values = bf16_to_f32(ours) if infos[name].dtype == "BF16" else ours
        np.testing.assert_array_equal(values, ref.float().numpy())


def test_reference_reads_files_we_write(tmp_path):
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((4, 6)).astype(np.float32)
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, {"x": ("BF16", f32), "y": ("F16", f32), "z": ("F32", f32)}, {"k": "v"})
    loaded = torch_load_file(str(path))
    assert loaded["x"].dtype == torch.bfloat16
    # Our bf16 rounding equals torch's (round to nearest even).
    torch.testing.assert_close(loaded["x"], torch.from_numpy(f32).to(torch.bfloat16), rtol=0, atol=0)
    np.testing.assert_array_equal(loaded["y"].numpy(), f32.astype(np.float16))
    np.testing.assert_array_equal(loaded["z"].numpy(), f32)
    assert not list(tmp_path.glob("*.tmp"))


def test_bf16_rounding_matches_torch_on_edge_values():
    values = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, 1e-40, np.inf, -np.inf],
                      dtype=np.float32)
    ours = bf16_to_f32(f32_to_bf16(values))
    ref = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, ref)
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], dtype=np.float32))))[0]


def _raw_file(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize(
    "header, data, message",
    [
        (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8, "only 8 bytes"),
        (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}', b"\0" * 16, "span 12 bytes"),
        (b'{"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 16, "unsupported dtype"),
        (b'{"w": {"dtype": "F32", "shape": [4]}}', b"\0" * 16, "lacks dtype/shape/data_offsets"),
        (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
         b'"v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', b"\0" * 16, "overlap"),
        (b'{"w": ', b"", "not valid JSON"),
    ],
)
def test_lying_or_broken_headers_name_file_and_tensor(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, header, data)
    with pytest.raises(CheckpointError, match=message) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    np_save_file({"w": np.ones((64,), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"tensor 'w'.*truncated"):
        read_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        read_header(path)
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        read_header(path)
