"""Streaming Keras loads: tensor by tensor, and all or nothing when a read fails part-way."""

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


def test_streamed_load_matches_the_file(tmp_path):
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


def test_failure_part_way_restores_every_variable(tmp_path):
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
