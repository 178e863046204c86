"""Hostile checkpoints and bad loads through the public API (issue 6), for both frameworks.

* Pickles with a code-executing payload: refused through ``hubload.load(path, model=...)`` and
  ``hubload inspect``; a marker file the payload would create proves it never ran (a control load with
  ``weights_only=False`` shows the payload is live).
* ``.keras`` with a Lambda layer: refused through ``hubload.load(path)``; same marker proof.
* Wrong shapes, missing and unexpected keys in strict mode: ``IncompatibleWeightsError`` and every
  parameter/buffer/variable bit-identical to before.
* dtype policy: a cast between floating types, or from an integer to a float, loads and is reported in
  ``report.dtype_casts``; a cast that destroys values (float/complex -> integer or bool, complex -> real)
  is refused (reported as an unsafe cast).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hubload
from hubload.cache import sha256_file
from hubload.errors import IncompatibleWeightsError, UnsafeCheckpointError


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubload", *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ))


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ================================================================================================= torch


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _net(torch, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        net[1].running_mean.uniform_()
        net[1].num_batches_tracked.fill_(5)
    return net


def _snapshot_torch(model):
    """Every parameter and buffer, cloned, with dtype and device."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_torch_identical(model, before):
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, v in before.items():
        a = after[k].detach()
        assert a.dtype == v.dtype and a.shape == v.shape, k
        assert torch_equal_bits(a, v), f"{k} changed"


def torch_equal_bits(a, b) -> bool:
    """Bitwise equality (NaN-safe, -0.0 vs 0.0 distinguished)."""
    import torch as _t

    return bool(_t.equal(a.reshape(-1).contiguous().view(_t.uint8), b.reshape(-1).contiguous().view(_t.uint8)))


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
def test_pickle_payload_never_runs_through_load_and_inspect(torch, tmp_path, kind):
    def write(path: Path, marker: Path) -> Path:
        obj = {"evil": _Payload(str(marker)), "0.weight": torch.zeros(3, 4)}  # payload first: named in the error
        if kind == "zip":
            torch.save(obj, path)
        elif kind == "legacy":
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        else:
            path.write_bytes(pickle.dumps(obj, protocol=2))
        return path

    # control: the payload is live (an unsafe load creates its marker)
    control_marker = tmp_path / "control-ran"
    control = write(tmp_path / "control.pt", control_marker)
    if kind == "raw-pickle":
        pickle.loads(control.read_bytes())
    else:
        torch.load(control, weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "PAYLOAD-RAN"
    path = write(tmp_path / ("evil.bin" if kind == "legacy" else "evil.pt"), marker)
    model = _net(torch)
    before = _snapshot_torch(model)
    with pytest.raises(UnsafeCheckpointError) as ei:
        hubload.load(str(path), model=model)
    msg = str(ei.value)
    assert str(path) in msg and "arbitrary code" in msg and "open" in msg, msg  # names the forbidden global
    assert not marker.exists()
    _assert_torch_identical(model, before)
    with pytest.raises(UnsafeCheckpointError):
        hubload.inspect(str(path))
    with pytest.raises(UnsafeCheckpointError):
        hubload.check(str(path), model=model)
    assert not marker.exists()

    proc = _run_cli("inspect", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hubload: error: UnsafeCheckpointError:") and str(path) in lines[0]
    assert not marker.exists()


def test_pickle_payload_from_a_registry_entry_is_verified_then_refused(torch, tmp_path):
    marker = tmp_path / "PAYLOAD-RAN"
    src = tmp_path / "weights"
    src.mkdir()
    path = src / "model.pt"
    torch.save({"0.weight": torch.zeros(3, 4), "evil": _Payload(str(marker))}, path)
    reg = {"version": 1, "models": {"evil": {"source": f"file://{src}",
                                              "files": [{"path": "model.pt", "sha256": sha256_file(path)}]}}}
    model = _net(torch)
    before = _snapshot_torch(model)
    with pytest.raises(UnsafeCheckpointError):
        hubload.load("evil", model=model, registry=reg)  # the hash matches: trust in bytes is not trust in code
    assert not marker.exists()
    _assert_torch_identical(model, before)


def _save_state(torch, path, sd):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("case", ["shape", "missing", "unexpected", "shape-non-strict", "renamed-all"])
def test_strict_failures_leave_the_torch_model_bit_identical(torch, tmp_path, case):
    good = _net(torch, seed=1).state_dict()
    sd = dict(good)
    if case.startswith("shape"):
        sd["2.weight"] = torch.ones(2, 4)
    elif case == "missing":
        del sd["1.running_var"]
    elif case == "unexpected":
        sd["3.weight"] = torch.ones(1)
    else:
        sd = {"x" + k: v for k, v in sd.items()}
    path = _save_state(torch, tmp_path / "ckpt.safetensors", sd)
    model = _net(torch, seed=0)
    before = _snapshot_torch(model)
    with pytest.raises(IncompatibleWeightsError) as ei:
        hubload.load(str(path), model=model, strict=case != "shape-non-strict")
    report = ei.value.report
    assert report is not None and not report.ok
    if case.startswith("shape"):
        assert [m.key for m in report.shape_mismatches] == ["2.weight"] and "2.weight" in str(ei.value)
    elif case == "missing":
        assert report.missing == ["1.running_var"] and "1.running_var" in str(ei.value)
    elif case == "unexpected":
        assert report.unexpected == ["3.weight"] and "3.weight" in str(ei.value)
    _assert_torch_identical(model, before)


def test_dtype_policy_safe_casts_load_and_are_reported(torch, tmp_path):
    src = _net(torch, seed=1)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["0.weight"] = sd["0.weight"].double()               # float64 -> float32: reported cast
    sd["0.bias"] = torch.tensor([1, -2, 3], dtype=torch.int32)  # int -> float: exact, reported cast
    sd["2.weight"] = sd["2.weight"].to(torch.bfloat16)     # bf16 -> float32: widening, reported
    path = _save_state(torch, tmp_path / "mixed.safetensors", sd)
    model = _net(torch, seed=0)
    model, report = hubload.load(str(path), model=model, return_report=True)
    casts = {(c.key, c.from_dtype, c.to_dtype) for c in report.dtype_casts}
    assert casts == {("0.weight", "float64", "float32"), ("0.bias", "int32", "float32"),
                     ("2.weight", "bfloat16", "float32")}
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, sd["0.weight"].float())
    assert torch.equal(model[0].bias, torch.tensor([1.0, -2.0, 3.0]))
    assert torch.equal(model[2].weight, sd["2.weight"].float())


@pytest.mark.parametrize("bad", ["float-into-int", "complex-into-float"])
def test_value_destroying_casts_are_refused_and_leave_the_model_untouched(torch, tmp_path, bad):
    sd = dict(_net(torch, seed=1).state_dict())
    if bad == "float-into-int":
        sd["1.num_batches_tracked"] = torch.tensor(3.7, dtype=torch.float32)
    else:
        sd["0.bias"] = torch.tensor([1 + 2j, 3 - 1j, 0.5j], dtype=torch.complex64)
    path = _save_state(torch, tmp_path / "bad.safetensors", sd)
    model = _net(torch, seed=0)
    before = _snapshot_torch(model)
    try:
        with pytest.raises(IncompatibleWeightsError, match="cast"):
            hubload.load(str(path), model=model)
    finally:
        _assert_torch_identical(model, before)


# ================================================================================================= keras


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tensorflow")
    return pytest.importorskip("keras")


def _keras_net(keras, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,))
    x = keras.layers.Dense(3, name="d1")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    out = keras.layers.Dense(2, name="d2")(x)
    return keras.Model(inp, out)


def _keras_snapshot(model):
    return [(v.path, np.array(v.numpy())) for v in model.weights]


def _assert_keras_identical(model, before):
    after = _keras_snapshot(model)
    assert [p for p, _ in after] == [p for p, _ in before]
    for (p, a), (_, b) in zip(after, before):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f"{p} changed"


def _canonical_state(keras, model) -> dict[str, np.ndarray]:
    """The model's weights in the canonical (torch) layout, as hubload names them."""
    from hubload.adapters import tf as tf_adapter

    spec = tf_adapter.spec(model)
    out = {}
    for name, t in spec.items():
        arr = np.array(t.handle.numpy())
        out[name] = t.transform.inverse().apply(arr) if t.transform is not None else arr
    return out


@pytest.mark.parametrize("case", ["shape", "missing", "unexpected", "shape-non-strict"])
def test_strict_failures_leave_the_keras_model_bit_identical(keras, tmp_path, case):
    from safetensors.numpy import save_file

    sd = _canonical_state(keras, _keras_net(keras, seed=1))
    assert "d1.weight" in sd and sd["d1.weight"].shape == (3, 4)  # canonical [out, in]
    if case.startswith("shape"):
        sd["d2.weight"] = np.ones((2, 5), np.float32)
    elif case == "missing":
        del sd["bn.running_var"]
    else:
        sd["d3.weight"] = np.ones((1,), np.float32)
    path = tmp_path / "k.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    model = _keras_net(keras, seed=0)
    before = _keras_snapshot(model)
    with pytest.raises(IncompatibleWeightsError) as ei:
        hubload.load(str(path), model=model, strict=case != "shape-non-strict")
    assert ei.value.report is not None and not ei.value.report.ok
    _assert_keras_identical(model, before)


def test_keras_good_load_changes_every_variable(keras, tmp_path):
    """The positive control for the bit-identical checks above: a good file does change the model."""
    from safetensors.numpy import save_file

    sd = _canonical_state(keras, _keras_net(keras, seed=1))
    path = tmp_path / "k.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    model = _keras_net(keras, seed=0)
    hubload.load(str(path), model=model)
    assert _canonical_state(keras, model).keys() == sd.keys()
    for k, v in _canonical_state(keras, model).items():
        np.testing.assert_array_equal(v, sd[k])


def test_keras_lambda_layer_is_refused_and_never_runs(keras, tmp_path):
    marker = tmp_path / "LAMBDA-RAN"
    m = str(marker)

    inp = keras.Input((2,))
    model = keras.Model(inp, keras.layers.Lambda(lambda x: (open(m, "w").close(), x * 2)[1], name="evil")(inp))
    path = tmp_path / "evil.keras"
    model.save(path)
    marker.unlink(missing_ok=True)  # building the model ran the function once; start clean

    keras.saving.load_model(path, safe_mode=False)  # control: an unsafe load runs the payload
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError) as ei:
        hubload.load(str(path))
    assert str(path) in str(ei.value) and "Lambda" in str(ei.value)
    assert not marker.exists()
