"""The Keras transfer-learning pattern: a keras.applications base model inside a functional or Sequential model
with a new head. The base model's own files (its ``.weights.h5``, and that file converted to the torch layout)
fill the base inside the wrapper exactly, and the wrapper's file fills a bare base; the head is left alone."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
import keras  # noqa: E402

import hubload  # noqa: E402

SHAPE = (32, 32, 3)


def _base():
    return keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=SHAPE, alpha=0.35)


def _functional():
    base = _base()
    inp = keras.Input(SHAPE)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(base(inp)))
    return keras.Model(inp, out), base


def _sequential():
    base = _base()
    return keras.Sequential([keras.Input(SHAPE), base, keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3, name="head")]), base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    base = _base()
    rng = np.random.default_rng(0)
    for w in base.weights:
        value = rng.standard_normal(w.shape).astype("float32") * 0.1
        w.assign(np.abs(value) + 0.5 if "variance" in w.path else value)
    base.save_weights(str(d / "base.weights.h5"))
    hubload.convert(d / "base.weights.h5", layout="torch", out=d / "base.safetensors", model=_base())
    x = rng.standard_normal((2, *SHAPE)).astype("float32")
    return d, base, x, np.asarray(base(x))


@pytest.mark.parametrize("wrap", [_functional, _sequential])
@pytest.mark.parametrize("name", ["base.weights.h5", "base.safetensors"])
def test_base_models_file_fills_the_base_inside_a_wrapper(files, wrap, name) -> None:
    d, src, x, want = files
    model, base = wrap()
    head = [np.asarray(w.numpy()).copy() for w in model.get_layer("head").weights]
    _, report = hubload.load(d / name, model=model, exclude=["head.*"], return_report=True)
    assert report.ok and len(report.matched) == len(src.weights)
    assert "added" in report.render()  # the prefix is named in the report
    np.testing.assert_array_equal(np.asarray(base(x)), want)
    for before, w in zip(head, model.get_layer("head").weights):
        np.testing.assert_array_equal(before, np.asarray(w.numpy()))


def test_wrappers_file_fills_a_bare_base(files, tmp_path) -> None:
    d, src, x, want = files
    model, _ = _functional()
    hubload.load(d / "base.weights.h5", model=model, exclude=["head.*"])
    model.save_weights(str(tmp_path / "wrapped.weights.h5"))
    hubload.convert(tmp_path / "wrapped.weights.h5", layout="torch", out=tmp_path / "wrapped.safetensors",
                    model=_functional()[0])
    bare = _base()
    _, report = hubload.load(tmp_path / "wrapped.safetensors", model=bare, strict=False, return_report=True)
    assert len(report.matched) == len(src.weights) and sorted(report.unexpected) == ["head.bias", "head.weight"]
    np.testing.assert_array_equal(np.asarray(bare(x)), want)

