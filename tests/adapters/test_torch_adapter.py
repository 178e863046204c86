"""PyTorch adapter: safe pickle reader, spec, all-or-nothing apply, meta materialisation, build, get_adapter."""

from __future__ import annotations

import importlib.metadata
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import hubload.adapters  # noqa: E402
from hubload.adapters import ModelTensor, get_adapter  # noqa: E402
from hubload.adapters import torch as torch_adapter  # noqa: E402
from hubload.adapters.torch import TorchPickleReader  # noqa: E402
from hubload.compat import check  # noqa: E402
from hubload.errors import (  # noqa: E402
    CheckpointError,
    HubloadError,
    IncompatibleWeightsError,
    RegistryError,
    UnsafeCheckpointError,
)
from hubload.layout import to_canonical  # noqa: E402
from hubload.readers import open_checkpoint  # noqa: E402


class Net(torch.nn.Module):
    """Tiny model with a parameter-free buffer and an integer buffer."""

    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.dense1 = torch.nn.Linear(4, hidden)
        self.norm = torch.nn.BatchNorm1d(hidden)
        self.dense2 = torch.nn.Linear(hidden, 3)

    def forward(self, x):
        return self.dense2(torch.relu(self.norm(self.dense1(x))))


def _source(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # make the BatchNorm buffers non-default so they are checked too
        net.norm.running_mean.uniform_()
        net.norm.running_var.uniform_(0.5, 1.5)
        net.norm.num_batches_tracked.fill_(7)
    return net.eval()


def _plan(model, reader, **check_kwargs):
    ckpt = to_canonical(reader.tensors(), reader.layout)
    return check(ckpt, torch_adapter.spec(model), **check_kwargs)


def _load(model, path, *, key=None, **options):
    with open_checkpoint(path, key=key) as reader:
        report = _plan(model, reader)
        report.raise_if_incompatible()
        torch_adapter.apply(model, report, reader, **options)
    return report


def _save(state_dict, path) -> None:
    """Write a state dict as ``.pt`` or ``.safetensors``, by the path's suffix."""
    if path.suffix == ".pt":
        torch.save(state_dict, path)
    else:
        safetensors_torch.save_file(state_dict, str(path))


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------- reader


def test_reader_flat_state_dict_metadata(tmp_path):
    src = _source()
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)

    with TorchPickleReader(path) as reader:
        infos = reader.tensors()
        assert reader.key is None and reader.format == "torch" and reader.layout == "torch"
        assert list(infos) == list(src.state_dict())
        for k, t in src.state_dict().items():
            assert infos[k].shape == tuple(t.shape)
            assert infos[k].nbytes == t.numel() * t.element_size()
        assert infos["norm.num_batches_tracked"].dtype == "int64"
        assert infos["dense1.weight"].dtype == "float32"
        assert torch.equal(reader.get("dense1.weight"), src.dense1.weight)
        with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
            reader.get("nope")


def test_open_checkpoint_uses_torch_reader(tmp_path):
    path = tmp_path / "w.bin"
    torch.save(_source().state_dict(), path)
    with open_checkpoint(path) as reader:
        assert isinstance(reader, TorchPickleReader)


def test_reader_refuses_code_execution_and_never_runs_it(tmp_path):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": Payload()}, path)

    with pytest.raises(UnsafeCheckpointError) as info:
        TorchPickleReader(path)
    msg = str(info.value)
    assert str(path) in msg and "system" in msg and "not trust" in msg
    with pytest.raises(UnsafeCheckpointError):
        open_checkpoint(path)
    assert not marker.exists()


def test_reader_refuses_custom_class_naming_it(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"weight": torch.zeros(2), "cfg": Net}, path)  # a class object is a pickle GLOBAL
    with pytest.raises(UnsafeCheckpointError, match=r"Net"):
        TorchPickleReader(path)


def test_reader_nested_state_dict_autodetected(tmp_path):
    src = _source()
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3, "hparams": {"lr": 0.1}}, path)

    with TorchPickleReader(path) as reader:
        assert reader.key == "state_dict"
        assert reader.other_entries == ["epoch", "hparams"]
        assert set(reader.tensors()) == set(src.state_dict())

    model = Net().eval()
    _load(model, path)
    _assert_same_state(model, src)


def test_reader_explicit_key_and_bad_key(tmp_path):
    a, b = _source(0), _source(1)
    path = tmp_path / "two.pt"
    torch.save({"model": a.state_dict(), "ema": b.state_dict()}, path)

    with TorchPickleReader(path) as reader:
        assert reader.key == "model"
    model = Net().eval()
    _load(model, path, key="ema")
    _assert_same_state(model, b)
    with pytest.raises(CheckpointError, match="'missing'.*ema"):
        TorchPickleReader(path, key="missing")


def test_reader_skips_non_tensor_entries(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(2), "step": 5, "name": "x"}, path)
    with TorchPickleReader(path) as reader:
        assert list(reader.tensors()) == ["w"]
        assert sorted(reader.skipped) == ["name", "step"]


def test_reader_legacy_non_zip_format(tmp_path):
    src = _source()
    path = tmp_path / "legacy.pt"
    torch.save(src.state_dict(), path, _use_new_zipfile_serialization=False)
    model = Net().eval()
    _load(model, path)
    _assert_same_state(model, src)


def test_reader_rejects_garbage_and_non_dicts(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        TorchPickleReader(garbage)
    lone = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), lone)
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        TorchPickleReader(lone)
    nothing = tmp_path / "nothing.pt"
    torch.save({"epoch": 1}, nothing)
    with pytest.raises(CheckpointError, match="key="):
        TorchPickleReader(nothing)


# ------------------------------------------------------------------------------------------------ spec


def test_spec_is_state_dict_in_canonical_terms():
    model = Net()
    spec = torch_adapter.spec(model)
    sd = model.state_dict()
    assert list(spec) == list(sd)
    for k, t in sd.items():
        assert isinstance(spec[k], ModelTensor)
        assert spec[k].shape == tuple(t.shape) and spec[k].native == k and spec[k].transform is None
    assert spec["dense1.weight"].dtype == "float32"
    assert spec["norm.num_batches_tracked"].dtype == "int64"
    assert spec["dense1.weight"].handle is model.dense1.weight


def test_spec_on_meta_device():
    with torch.device("meta"):
        model = Net()
    spec = torch_adapter.spec(model)
    assert spec["dense1.weight"].shape == (6, 4)


# ----------------------------------------------------------------------------------------------- apply


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_apply_loads_everything(tmp_path, suffix):
    src = _source()
    path = tmp_path / f"w{suffix}"
    _save(src.state_dict(), path)
    model = Net().eval()

    report = _load(model, path)

    assert report.ok and len(report.matched) == len(src.state_dict())
    _assert_same_state(model, src)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_to_torch_copy_source_is_a_view_of_the_readers_map(tmp_path):
    src = _source()
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    with open_checkpoint(path) as reader:
        base = reader.buffer().ctypes.data
        storages = torch_adapter._FileStorages()
        w, ro_w = torch_adapter.to_torch(reader, "dense1.weight", _storages=storages, owned=False)
        b, ro_b = torch_adapter.to_torch(reader, "dense2.bias", _storages=storages, owned=False)
        assert ro_w and ro_b  # read-only memory: must be cloned before a model may own it
        assert torch.equal(w, src.dense1.weight) and torch.equal(b, src.dense2.bias)
        assert w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == base  # one storage per file
        owned, ro = torch_adapter.to_torch(reader, "dense1.weight", owned=True)
        assert not ro and torch.equal(owned, src.dense1.weight)
        assert owned.untyped_storage().data_ptr() != base  # the private copy-on-write map


def _unaligned_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file whose data starts at an odd offset (its header is not padded to 8 bytes)."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        raw = t.detach().contiguous().numpy().tobytes()  # little-endian on every machine torch runs on
        dt = {torch.float32: "F32", torch.uint8: "U8", torch.int64: "I64"}[t.dtype]
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    while (8 + len(text)) % 4 != 1:  # the data starts 1 past a 4-byte boundary
        text += b" "
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("on_meta", [False, True])
def test_unaligned_tensor_data_loads_correctly(tmp_path, on_meta):
    src = _source()
    sd = {"pad": torch.tensor([1], dtype=torch.uint8), **src.state_dict()}
    path = tmp_path / "odd.safetensors"
    _unaligned_safetensors(path, sd)
    with open_checkpoint(path) as reader:
        start = reader.header.data_start + reader.header.offsets["dense1.weight"][0]
        assert start % 4  # the case under test: float32 data not on a 4-byte boundary
    if on_meta:
        with torch.device("meta"):
            model = Net()
    else:
        model = Net()
    with open_checkpoint(path) as reader:
        report = _plan(model, reader, ignore=["pad"])
        torch_adapter.apply(model, report, reader)
    assert report.ok
    _assert_same_state(model.eval(), src)


def test_shape_mismatch_fails_before_any_copy(tmp_path):
    src = _source()
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.dense2 = torch.nn.Linear(6, 5)

    model = Wider()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(IncompatibleWeightsError) as info:
        _load(model, path)

    msg = str(info.value)
    assert "dense2.weight" in msg and "[3, 6]" in msg and "[5, 6]" in msg
    assert info.value.report.shape_mismatches
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_apply_is_all_or_nothing_when_a_late_tensor_is_bad(tmp_path):
    """The report was made from one file, the reader serves another whose LAST tensor differs."""
    src = _source()
    good = tmp_path / "good.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(good))
    bad_sd = dict(src.state_dict())
    bad_sd["dense2.bias"] = torch.zeros(4)
    bad = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(bad_sd, str(bad))
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with open_checkpoint(good) as reader:
        report = _plan(model, reader)
    assert report.matched[-1].key == "dense2.bias"
    with open_checkpoint(bad) as reader, pytest.raises(IncompatibleWeightsError, match=r"dense2.bias.*\[4\].*\[3\]"):
        torch_adapter.apply(model, report, reader)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_apply_refuses_an_incompatible_report(tmp_path):
    path = tmp_path / "partial.safetensors"
    sd = _source().state_dict()
    del sd["dense2.bias"]
    safetensors_torch.save_file(sd, str(path))
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with open_checkpoint(path) as reader:
        report = _plan(model, reader)
        with pytest.raises(IncompatibleWeightsError, match="dense2.bias"):
            torch_adapter.apply(model, report, reader)
        # non-strict: the matching tensors load, the missing one is left alone
        report = _plan(model, reader, strict=False)
        torch_adapter.apply(model, report, reader)
    assert torch.equal(model.dense2.bias, before["dense2.bias"])
    assert torch.equal(model.dense1.weight, sd["dense1.weight"])


def test_ddp_module_prefix_loads(tmp_path):
    src = _source()
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    model = Net().eval()
    report = _load(model, path)
    assert report.prefix_changes
    assert {m.source for m in report.matched} == {f"module.{k}" for k in src.state_dict()}
    _assert_same_state(model, src)


def test_dtype_policies(tmp_path):
    src = _source()
    path = tmp_path / "half.safetensors"
    safetensors_torch.save_file({k: (v.half() if v.is_floating_point() else v) for k, v in src.state_dict().items()},
                                str(path))
    model = Net()
    report = _load(model, path)
    assert {(c.from_dtype, c.to_dtype) for c in report.dtype_casts} == {("float16", "float32")}
    assert model.dense1.weight.dtype == torch.float32
    assert torch.equal(model.dense1.weight, src.dense1.weight.half().float())

    kept = Net()
    _load(kept, path, dtype_policy="checkpoint")
    assert kept.dense1.weight.dtype == torch.float16 and isinstance(kept.dense1.weight, torch.nn.Parameter)
    as_bf16 = Net()
    _load(as_bf16, path, dtype_policy="bfloat16")
    assert as_bf16.dense1.weight.dtype == torch.bfloat16
    assert as_bf16.norm.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_meta_model_materialised_without_a_second_copy(tmp_path, suffix):
    src = _source()
    path = tmp_path / f"w{suffix}"
    _save(src.state_dict(), path)
    with torch.device("meta"):
        model = Net().eval()

    with open_checkpoint(path) as reader:
        report = _plan(model, reader)
        torch_adapter.apply(model, report, reader)
        if suffix == ".pt":  # the parameter IS the memory-mapped checkpoint tensor
            assert model.dense1.weight.data_ptr() == reader.get("dense1.weight").data_ptr()

    assert not any(t.is_meta for t in model.state_dict().values())
    assert isinstance(model.dense1.weight, torch.nn.Parameter) and model.dense1.weight.requires_grad
    _assert_same_state(model, src)
    if suffix == ".safetensors":  # all tensors are views of one file mapping, not copies
        ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
        assert len(ptrs) == 1
    # The mapping is copy-on-write: the model may be trained, the file never changes.
    raw = path.read_bytes()
    with torch.no_grad():
        model.dense1.weight.add_(1.0)
    assert path.read_bytes() == raw


def test_meta_model_with_missing_tensor_warns(tmp_path, caplog):
    sd = _source().state_dict()
    del sd["dense2.bias"]
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with torch.device("meta"):
        model = Net()
    with open_checkpoint(path) as reader:
        report = _plan(model, reader, strict=False)
        with caplog.at_level("WARNING", logger="hubload"):
            torch_adapter.apply(model, report, reader)
    assert model.dense2.bias.is_meta and not model.dense1.weight.is_meta
    assert "dense2.bias" in caplog.text


# ----------------------------------------------------------------------------------------------- build


def test_build_from_zoo():
    model = torch_adapter.build("hubload.zoo.torch_models:mlp", {"in_features": 4, "hidden": 5, "num_classes": 2})
    assert isinstance(model, torch.nn.Module)
    assert torch_adapter.spec(model)  # has parameters


@pytest.mark.parametrize(("arch", "config", "pattern"), [
    ("no_such_module_xyz:thing", {}, "no_such_module_xyz"),
    ("hubload.zoo.torch_models:no_such_factory", {}, "no_such_factory"),
    ("hubload.zoo.torch_models", {}, "package.module:callable"),
    ("hubload.zoo.torch_models:mlp", {"bogus": 1}, "bogus"),
    ("hubload.zoo.torch_models:__name__", {}, "not a callable"),
    ("collections:OrderedDict", {}, "not a torch.nn.Module"),
])
def test_build_errors_name_the_architecture(arch, config, pattern):
    with pytest.raises(RegistryError, match=pattern):
        torch_adapter.build(arch, config)


# ------------------------------------------------------------------------------------------ get_adapter


@pytest.mark.parametrize("name", ["torch", "pt", "pytorch", "PyTorch"])
def test_get_adapter_by_name(name):
    assert get_adapter(name) is torch_adapter


def test_get_adapter_by_model():
    assert get_adapter(Net()) is torch_adapter
    assert torch_adapter.owns(Net()) and not torch_adapter.owns(object())
    with pytest.raises(HubloadError, match="no hubload adapter handles"):
        get_adapter(object())
    with pytest.raises(HubloadError, match="no hubload adapter named 'jaxx'"):
        get_adapter("jaxx")


def test_get_adapter_entry_point_fallback(tmp_path, monkeypatch):
    (tmp_path / "fake_fw_adapter.py").write_text(textwrap.dedent("""
        name = "fakefw"
        def owns(model): return type(model).__name__ == "FakeModel"
        def spec(model): return {}
        def apply(model, report, reader, **options): pass
        def build(architecture, config): return None
        # The rest of the Protocol (everything hubload.load/check use), so the fake is a complete adapter.
        native_layout, native_formats, apply_options, dtype_policies = "torch", (), frozenset(), None
        def collective_load(model): return False
        def build_scope(strategy): raise NotImplementedError
        def place(model, device): return model
        def freeze(model, names): pass
        def restore_native(model, path, optimizer=None): raise NotImplementedError
        def load_full(path): raise NotImplementedError
        def describe(model, spec, inputs=None): return {}
        def run(model, inputs, *, spec=None, record=False, values=None): return [], []
        def checkpoint_values(model, report, reader, spec): return {}
        def snapshot(model, names, spec): return None
        def restore(model, snapshot): pass
        def read_tensor(tensor): return None
        def infer_inputs(model): return None
        def to_native_inputs(model, inputs): return list(inputs)
        def to_canonical_inputs(model, inputs): return list(inputs)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="fakefw", value="fake_fw_adapter", group="hubload.adapters")
    real = importlib.metadata.entry_points

    def fake_entry_points(**kwargs):
        if kwargs.get("group") == "hubload.adapters":
            return [ep]
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    adapter = get_adapter("fakefw")
    assert adapter.name == "fakefw"
    assert isinstance(adapter, hubload.adapters.Adapter)


def test_importing_adapters_package_imports_no_framework():
    code = ("import sys, hubload.adapters as a; a.ModelTensor; a.get_adapter; "
            "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_framework_raises_missing_dependency():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # behave as if torch were not installed
        from hubload.adapters import get_adapter
        from hubload.errors import MissingDependencyError
        try:
            get_adapter("pytorch")
        except MissingDependencyError as exc:
            assert 'pip install "hubload[torch]"' in str(exc), exc
        else:
            raise SystemExit("no MissingDependencyError")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_freeze_by_state_dict_key():
    model = Net()
    torch_adapter.freeze(model, ["dense1.weight", "dense1.bias", "norm.running_mean"])
    assert not model.dense1.weight.requires_grad and not model.dense1.bias.requires_grad
    assert model.dense2.weight.requires_grad and model.norm.weight.requires_grad
    with pytest.raises(HubloadError, match="nope"):
        torch_adapter.freeze(model, ["nope"])
