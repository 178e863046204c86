"""Reading one rank's box of a checkpoint tensor: torch pickle offsets and layout permutations."""

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


def test_a_permuted_layout_reads_the_matching_box_of_the_checkpoint(tmp_path):
    # A keras-layout kernel [in, out] feeding a torch weight [out, in]: rank boxes are cut in canonical coordinates.
    from safetensors.torch import save_file

    from hubload.adapters.torch import _torch_dtype, relayout, to_torch
    from hubload.adapters.torch_dtensor import _Loader
    from hubload.layout import Transform
    from hubload.safetensors_io import SafetensorsReader

    kernel = torch.randn(12, 10)
    save_file({"k": kernel}, str(tmp_path / "k.safetensors"))
    loader = _Loader(SafetensorsReader(tmp_path / "k.safetensors"), to_torch, relayout, _torch_dtype)
    canonical = kernel.t()
    for offset, shape in [((0, 0), (3, 12)), ((9, 0), (1, 12)), ((2, 6), (5, 6)), ((0, 0), (0, 12))]:
        got = loader.box("k", Transform(perm=(1, 0)), offset, shape)
        assert got.is_contiguous()
        assert torch.equal(got, canonical[offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1]])
