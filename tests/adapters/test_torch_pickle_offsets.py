"""Where a torch pickle's tensors lie in the file, so a rank of a sharded model can read only its slice."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hubload.adapters.torch import TorchPickleReader  # noqa: E402


def _bytes_at(path, offset, t):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(t.numel() * t.element_size())


def test_zip_checkpoint_offsets_point_at_each_tensor(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"w": base, "tail": base[2:],  # a view sharing w's storage, at an offset
             "t": base.t(),  # not contiguous: no direct read
             "h": torch.randn(3, 5).to(torch.bfloat16)}
    path = tmp_path / "m.pt"
    torch.save({"model": state, "epoch": 3}, path)
    reader = TorchPickleReader(path)
    assert reader.key == "model"
    for name in ("w", "tail", "h"):
        t = reader.get(name)
        assert _bytes_at(path, reader.data_offset(name), t) == t.contiguous().view(torch.uint8).numpy().tobytes()
    assert reader.data_offset("tail") == reader.data_offset("w") + 12 * 4
    assert reader.data_offset("t") is None


def test_legacy_checkpoint_has_no_offsets(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    reader = TorchPickleReader(path)
    assert reader.data_offset("w") is None
    assert torch.equal(reader.get("w"), torch.ones(3))
