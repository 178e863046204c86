"""Keras loads, all or nothing: small models are converted first and then assigned (the variables take the new
buffers over); over the in-memory rollback budget, tensor by tensor with old values spooled to a file. Both
paths restore every variable when a read or an assign fails part-way."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")
tf_adapter = pytest.importorskip("hubload.adapters.tf")

from hubload.compat import check  # noqa: E402
from hubload.errors import IncompatibleWeightsError  # noqa: E402
from hubload.layout import to_canonical  # noqa: E402
from hubload.readers import open_checkpoint  # noqa: E402
from hubload.relayout import write_safetensors  # noqa: E402


def _model():
    return keras.Sequential([keras.Input((8,))] + [keras.layers.Dense(8, name=f"d{i}") for i in range(3)])


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return {f"d{i}.{leaf}": rng.standard_normal(shape).astype(np.float32)
            for i in range(3) for leaf, shape in (("weight", (8, 8)), ("bias", (8,)))}


PATHS = pytest.mark.parametrize("budget,route", [(None, "_convert_then_assign"), (0, "_stream")],
                                ids=["in-memory", "streamed"])


def _on_path(monkeypatch, budget, route):
    """Force the path by the rollback budget; record which one ran."""
    from hubload.adapters import keras_apply

    if budget is not None:
        monkeypatch.setattr(keras_apply, "ROLLBACK_IN_MEMORY", budget)
    ran = []
    for name in ("_convert_then_assign", "_stream"):
        real = getattr(keras_apply, name)
        monkeypatch.setattr(keras_apply, name, lambda *a, _n=name, _r=real: ran.append(_n) or _r(*a))
    return ran


def _load(model, path):
    with open_checkpoint(path) as r:
        spec = tf_adapter.spec(model)
        tf_adapter.apply(model, check(to_canonical(r.tensors(), r.layout), spec), r, model_spec=spec)


@PATHS
def test_load_matches_the_file(tmp_path, monkeypatch, budget, route):
    ran = _on_path(monkeypatch, budget, route)
    arrays = _arrays(0)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, arrays)
    model = _model()
    with open_checkpoint(path) as r:
        spec = tf_adapter.spec(model)
        tf_adapter.apply(model, check(to_canonical(r.tensors(), r.layout), spec), r, model_spec=spec)
    for i in range(3):
        layer = model.get_layer(f"d{i}")
        np.testing.assert_array_equal(layer.kernel.numpy(), arrays[f"d{i}.weight"].T)
        np.testing.assert_array_equal(layer.bias.numpy(), arrays[f"d{i}.bias"])
    assert ran == [route]


@PATHS
def test_a_file_cut_short_after_the_check_restores_every_variable(tmp_path, monkeypatch, budget, route):
    """The read that runs out raises (the file is read, never memory-mapped: a mapped page past the end would
    fault, not raise)."""
    ran = _on_path(monkeypatch, budget, route)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, _arrays(1))
    model = _model()
    before = [v.numpy().copy() for v in model.weights]
    with open_checkpoint(path) as r:
        spec = tf_adapter.spec(model)
        report = check(to_canonical(r.tensors(), r.layout), spec)
        assert report.ok
        os.truncate(path, os.path.getsize(path) - 100)  # the file changes after the check: the last read fails
        with pytest.raises(IncompatibleWeightsError, match="restored, nothing changed"):
            tf_adapter.apply(model, report, r, model_spec=spec)
    for v, old in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), old)
    assert ran == [route]


def _fail_on_call(monkeypatch, name, n, exc):
    """keras_apply.<name> raises ``exc`` on its n-th call; returns the list of calls made."""
    from hubload.adapters import keras_apply

    calls = []
    real = getattr(keras_apply, name)

    def failing(*a, **kw):
        calls.append(a)
        if len(calls) == n:
            raise exc
        real(*a, **kw)

    monkeypatch.setattr(keras_apply, name, failing)
    return calls


def _load_fails_and_changes_nothing(tmp_path, seed, match):
    file = tmp_path / "w.safetensors"
    write_safetensors(file, _arrays(seed))
    model = _model()
    before = [v.numpy().copy() for v in model.weights]
    with pytest.raises(IncompatibleWeightsError, match=match):
        _load(model, file)
    for v, old in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), old)


@PATHS
def test_a_conversion_failing_part_way_changes_nothing(tmp_path, monkeypatch, budget, route):
    """The third tensor fails to convert (on a worker thread on the in-memory path): the error names it and
    no variable changed."""
    ran = _on_path(monkeypatch, budget, route)
    calls = _fail_on_call(monkeypatch, "_relayout_into", 3, MemoryError("cannot allocate the third tensor"))
    _load_fails_and_changes_nothing(tmp_path, 6, "third tensor.*nothing changed")
    assert len(calls) == 3 and ran == [route]


@PATHS
def test_an_assign_failing_part_way_restores_every_variable(tmp_path, monkeypatch, budget, route):
    """Every read succeeded, then the fourth assign fails (out of memory in TF): the three already assigned
    are put back bit for bit."""
    import tensorflow as tf

    ran = _on_path(monkeypatch, budget, route)
    calls = _fail_on_call(monkeypatch, "_assign", 4, tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"))
    _load_fails_and_changes_nothing(tmp_path, 2, "OOM when allocating.*restored, nothing changed")
    assert len(calls) == 4 and ran == [route]


@PATHS
def test_loaded_variables_own_their_values(tmp_path, monkeypatch, budget, route):
    """The variables take the converted buffers over: each stays independent (an update of one changes no
    other), a second load replaces the first, and training steps run on them."""
    _on_path(monkeypatch, budget, route)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(first, _arrays(3))
    write_safetensors(second, b := _arrays(4))
    model = _model()
    _load(model, first)
    held = [v.numpy().copy() for v in model.weights]
    model.get_layer("d0").kernel.assign_add(np.ones((8, 8), np.float32))
    np.testing.assert_array_equal(model.get_layer("d0").kernel.numpy(), held[0] + 1)
    for v, old in zip(model.weights[1:], held[1:]):
        np.testing.assert_array_equal(v.numpy(), old)
    _load(model, second)
    for i in range(3):
        np.testing.assert_array_equal(model.get_layer(f"d{i}").kernel.numpy(), b[f"d{i}.weight"].T)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 8), np.float32), np.zeros((4, 8), np.float32), epochs=1, verbose=0)
    assert not np.array_equal(model.get_layer("d2").bias.numpy(), b["d2.bias"])  # the step moved it


@PATHS
def test_a_bfloat16_model_gets_the_file_cast(tmp_path, monkeypatch, budget, route):
    """bfloat16 has no DLPack form here: the value is cast from the float32 file and assigned all the same."""
    import ml_dtypes

    ran = _on_path(monkeypatch, budget, route)
    file = tmp_path / "w.safetensors"
    write_safetensors(file, arrays := _arrays(5))
    model = keras.Sequential([keras.Input((8,))] + [keras.layers.Dense(8, name=f"d{i}", dtype="bfloat16")
                                                     for i in range(3)])
    _load(model, file)
    got = model.get_layer("d1").kernel.numpy()
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, arrays["d1.weight"].T.astype(ml_dtypes.bfloat16))
    assert ran == [route]
