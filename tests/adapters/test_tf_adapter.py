"""TF/Keras adapter: TF checkpoint reader, spec, all-or-nothing apply, strategies, native paths, build.

No torch here: canonical-layout sources are written with safetensors' numpy API.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from hubload.adapters import get_adapter  # noqa: E402
from hubload.adapters import tf as tf_adapter  # noqa: E402
from hubload.adapters.tf import TFCheckpointReader  # noqa: E402
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

IN_FEATURES = 8


class MyModel(keras.Model):
    """The seed example: Dense(64, relu) as dense1, Dense(10) as dense2."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.dense1 = keras.layers.Dense(hidden, activation="relu")
        self.dense2 = keras.layers.Dense(10)

    def call(self, x):
        return self.dense2(self.dense1(x))


@pytest.fixture
def x():
    return np.random.default_rng(0).random((5, IN_FEATURES), dtype=np.float32)


def _built(x, hidden: int = 64) -> MyModel:
    model = MyModel(hidden)
    model(x)
    return model


def _train_one_step(model, optimizer, x) -> None:
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))


@pytest.fixture
def trained(tmp_path, x):
    """(model, optimizer, prefix): MyModel trained one Adam step, saved with tf.train.Checkpoint."""
    model = _built(x)
    optimizer = keras.optimizers.Adam(learning_rate=0.01)
    _train_one_step(model, optimizer, x)
    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "ckpt" / "c"))
    return model, optimizer, prefix


def _values(model) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in model.weights]


def _assert_values(model, values) -> None:
    now = _values(model)
    assert len(now) == len(values)
    for a, b in zip(now, values):
        np.testing.assert_array_equal(a, b)


def _load(model, path):
    with open_checkpoint(path) as reader:
        report = check(to_canonical(reader.tensors(), reader.layout), tf_adapter.spec(model))
        report.raise_if_incompatible()
        tf_adapter.apply(model, report, reader)
    return report


def _canonical_file(model, path) -> None:
    """Write a Keras model's weights as a canonical (PyTorch-layout) safetensors file."""
    tensors = {}
    for name, t in tf_adapter.spec(model).items():
        arr = t.handle.numpy()
        if t.transform is not None:
            arr = t.transform.inverse().apply(arr)
        tensors[name] = np.ascontiguousarray(arr)
    safetensors_numpy.save_file(tensors, str(path))


# ---------------------------------------------------------------------------------------------- reader


def test_reader_strips_root_and_keeps_training_state_apart(trained):
    model, _, prefix = trained
    with TFCheckpointReader(prefix) as reader:
        infos = reader.tensors()
        assert reader.root == "model" and reader.layout == "keras" and reader.format == "tf-checkpoint"
        assert set(infos) == {"dense1/_kernel", "dense1/bias", "dense2/_kernel", "dense2/bias"}
        assert infos["dense1/_kernel"].shape == (IN_FEATURES, 64)
        assert infos["dense1/_kernel"].dtype == "float32" and infos["dense1/_kernel"].nbytes == IN_FEATURES * 64 * 4
        assert reader.save_counter == 1
        assert any(k.startswith("optimizer/") for k in reader.extra)
        assert "save_counter" in reader.extra
        assert not any("optimizer" in k for k in infos)
        np.testing.assert_array_equal(reader.get("dense1/_kernel"), model.dense1.kernel.numpy())
        assert int(reader.get_extra("optimizer/_iterations")) == 1
        with pytest.raises(CheckpointError, match="no variable named"):
            reader.get("optimizer/_iterations")


def test_open_checkpoint_finds_tf_reader_for_prefix_and_folder(trained, tmp_path):
    _, _, prefix = trained
    for path in (prefix, tmp_path / "ckpt", f"{prefix}.index"):
        with open_checkpoint(path) as reader:
            assert isinstance(reader, TFCheckpointReader)
            assert len(reader.tensors()) == 4


def test_reader_several_roots(tmp_path, x):
    big, small = _built(x), _built(x, hidden=3)
    small_extra = keras.layers.Dense(2)
    small_extra(np.zeros((1, 1), "float32"))
    prefix = tf.train.Checkpoint(model=big, head=small_extra).save(str(tmp_path / "two" / "c"))
    with TFCheckpointReader(prefix) as reader:
        assert reader.root == "model" and reader.roots == {"model": 4, "head": 2}
        assert "head/_kernel" in reader.extra
    with TFCheckpointReader(prefix, key="head") as reader:
        assert set(reader.tensors()) == {"_kernel", "bias"}
    with pytest.raises(CheckpointError, match="'nope'"):
        TFCheckpointReader(prefix, key="nope")


def test_reader_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a readable TF checkpoint"):
        TFCheckpointReader(tmp_path / "nothing" / "c-1")


# ------------------------------------------------------------------------------------------------ spec


def test_spec_translates_to_canonical(x):
    model = _built(x)
    spec = tf_adapter.spec(model)
    assert set(spec) == {"dense1.weight", "dense1.bias", "dense2.weight", "dense2.bias"}
    w = spec["dense1.weight"]
    assert w.shape == (64, IN_FEATURES) and w.native == "dense1/kernel" and w.dtype == "float32"
    assert w.rule == "dense-kernel" and w.handle is model.dense1.kernel
    assert w.transform.out_shape(w.shape) == (IN_FEATURES, 64)  # canonical -> Keras
    assert spec["dense2.bias"].transform is None


def test_spec_refuses_unbuilt_model():
    with pytest.raises(HubloadError, match="not built.*call it once"):
        tf_adapter.spec(MyModel())


# ----------------------------------------------------------------------------------------------- apply


def test_apply_from_tf_checkpoint(trained, x):
    model, _, prefix = trained
    fresh = _built(x)
    report = _load(fresh, prefix)
    assert report.ok and len(report.matched) == 4
    _assert_values(fresh, _values(model))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh(x)), keras.ops.convert_to_numpy(model(x)))


def test_apply_from_canonical_safetensors(tmp_path, x):
    src = _built(x)
    path = tmp_path / "w.safetensors"
    _canonical_file(src, path)
    fresh = _built(x)
    _load(fresh, path)
    _assert_values(fresh, _values(src))


def test_apply_casts_to_variable_dtype(tmp_path, x):
    src = _built(x)
    path = tmp_path / "w.safetensors"
    _canonical_file(src, path)
    half = {k: v.astype(np.float16) for k, v in safetensors_numpy.load_file(str(path)).items()}
    safetensors_numpy.save_file(half, str(path))
    fresh = _built(x)
    report = _load(fresh, path)
    assert {(c.from_dtype, c.to_dtype) for c in report.dtype_casts} == {("float16", "float32")}
    assert fresh.dense1.kernel.dtype == "float32"
    np.testing.assert_array_equal(fresh.dense1.kernel.numpy(), src.dense1.kernel.numpy().astype(np.float16))
    with pytest.raises(ValueError, match="dtype_policy"):
        tf_adapter.apply(fresh, check({}, {}), None, dtype_policy="float16")


def test_shape_mismatch_leaves_every_variable_untouched(trained, x):
    _, _, prefix = trained
    model = _built(x, hidden=32)
    before = _values(model)
    with pytest.raises(IncompatibleWeightsError) as info:
        _load(model, prefix)
    msg = str(info.value)
    assert "dense1.weight" in msg and "[64, 8]" in msg and "[32, 8]" in msg
    _assert_values(model, before)


def test_apply_is_all_or_nothing_when_a_late_tensor_is_bad(tmp_path, x):
    src = _built(x)
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    _canonical_file(src, good)
    tensors = safetensors_numpy.load_file(str(good))
    tensors["dense2.bias"] = np.zeros(4, np.float32)
    safetensors_numpy.save_file(tensors, str(bad))
    model = _built(x)
    before = _values(model)
    with open_checkpoint(good) as reader:
        report = check(to_canonical(reader.tensors(), reader.layout), tf_adapter.spec(model))
    assert report.matched[-1].key == "dense2.bias"
    with open_checkpoint(bad) as reader, pytest.raises(IncompatibleWeightsError, match=r"dense2.bias.*\[4\]"):
        tf_adapter.apply(model, report, reader)
    _assert_values(model, before)


@pytest.mark.parametrize("make_strategy", [
    lambda: tf.distribute.OneDeviceStrategy("/cpu:0"),
    lambda: tf.distribute.MirroredStrategy(["/cpu:0"]),
], ids=["one-device", "mirrored"])
@pytest.mark.parametrize("inside_scope", [False, True], ids=["outside", "inside"])
def test_load_under_distribution_strategy(trained, x, make_strategy, inside_scope):
    src, _, prefix = trained
    strategy = make_strategy()
    with strategy.scope():
        model = _built(x)
    if inside_scope:
        with strategy.scope():
            _load(model, prefix)
    else:
        _load(model, prefix)
    _assert_values(model, _values(src))
    out = strategy.run(lambda inp: model(inp), args=(tf.constant(x),))
    np.testing.assert_array_equal(strategy.experimental_local_results(out)[0].numpy(),
                                  keras.ops.convert_to_numpy(src(x)))


# ---------------------------------------------------------------------------------------- native paths


def test_restore_native_with_optimizer(trained, x):
    src, src_opt, prefix = trained
    model = _built(x)
    optimizer = keras.optimizers.Adam(learning_rate=0.01)

    report = tf_adapter.restore_native(model, prefix, optimizer=optimizer)

    assert report.ok
    _assert_values(model, _values(src))
    assert int(optimizer.iterations.numpy()) == 1
    for a, b in zip(src_opt.variables, optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Training continues identically from the restored state.
    _train_one_step(src, src_opt, x)
    _train_one_step(model, optimizer, x)
    np.testing.assert_allclose(model.dense1.kernel.numpy(), src.dense1.kernel.numpy(), rtol=0, atol=1e-7)


def test_restore_native_mismatch_reports_and_changes_nothing(trained, x):
    _, _, prefix = trained
    model = _built(x, hidden=32)
    before = _values(model)
    with pytest.raises(IncompatibleWeightsError) as info:
        tf_adapter.restore_native(model, prefix)
    assert info.value.report.shape_mismatches
    _assert_values(model, before)


def test_restore_native_rolls_back_when_optimizer_state_does_not_match(tmp_path, x):
    """Model variables match by name, the optimizer's do not: TF restores part, hubload undoes it."""
    src = _built(x)
    sgd = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    _train_one_step(src, sgd, x)
    prefix = tf.train.Checkpoint(model=src, optimizer=sgd).save(str(tmp_path / "sgd" / "c"))
    model = _built(x)
    before = _values(model)
    with pytest.raises(IncompatibleWeightsError, match="left unchanged"):
        tf_adapter.restore_native(model, prefix, optimizer=keras.optimizers.Adam())
    _assert_values(model, before)


def test_load_weights_native(tmp_path, x):
    src = _built(x)
    path = tmp_path / "m.weights.h5"
    src.save_weights(str(path))
    model = _built(x)
    tf_adapter.load_weights(model, path)
    _assert_values(model, _values(src))

    other = _built(x, hidden=5)
    before = _values(other)
    with pytest.raises(IncompatibleWeightsError, match="m.weights.h5"):
        tf_adapter.load_weights(other, path)
    _assert_values(other, before)
    with pytest.raises(CheckpointError, match="no such file"):
        tf_adapter.load_weights(model, tmp_path / "absent.weights.h5")


def test_weights_h5_by_name_through_reader(tmp_path, x):
    src = _built(x)
    path = tmp_path / "m.weights.h5"
    src.save_weights(str(path))
    model = _built(x)
    _load(model, path)
    _assert_values(model, _values(src))


def test_load_full_keras_file(tmp_path, x):
    inputs = keras.Input((IN_FEATURES,))
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Dense(4, activation="relu", name="body")(inputs))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "m.keras"
    model.save(str(path))
    loaded = tf_adapter.load_full(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)))


def test_load_full_refuses_lambda_layer(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs))
    path = tmp_path / "lambda.keras"
    model.save(str(path))
    with pytest.raises(UnsafeCheckpointError, match=r"lambda\.keras.*Lambda.*not trust"):
        tf_adapter.load_full(path)


def test_load_full_saved_model(tmp_path, x):
    module = tf.Module()
    module.w = tf.Variable(np.arange(IN_FEATURES, dtype=np.float32))
    module.f = tf.function(lambda t: t * module.w, input_signature=[tf.TensorSpec([None, IN_FEATURES], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "sm"))
    loaded = tf_adapter.load_full(tmp_path / "sm")
    np.testing.assert_array_equal(loaded.f(tf.constant(x)).numpy(), x * np.arange(IN_FEATURES, dtype=np.float32))
    with pytest.raises(CheckpointError, match="not a whole-model artifact"):
        tf_adapter.load_full(tmp_path)


# ----------------------------------------------------------------------------------------------- build


def test_build_from_zoo_returns_built_model():
    model = tf_adapter.build("hubload.zoo.keras_models:mlp", {"in_features": 4, "hidden": 5, "num_classes": 2})
    assert model.built and tf_adapter.spec(model)


def test_build_errors():
    with pytest.raises(RegistryError, match="no_such_factory"):
        tf_adapter.build("hubload.zoo.keras_models:no_such_factory", {})
    with pytest.raises(RegistryError, match="unbuilt"):
        tf_adapter.build("keras.layers:Dense", {"units": 3})
    with pytest.raises(RegistryError, match="not a Keras model"):
        tf_adapter.build("collections:OrderedDict", {})


@pytest.mark.parametrize("name", ["tf", "tensorflow", "keras"])
def test_get_adapter(name, x):
    assert get_adapter(name) is tf_adapter
    assert get_adapter(_built(x)) is tf_adapter
    assert tf_adapter.owns(keras.layers.Dense(2)) and not tf_adapter.owns(object())


def test_freeze_by_canonical_name(x):
    model = _built(x)
    tf_adapter.freeze(model, ["dense1.weight", "dense1.bias"])
    assert {v.path.rsplit("/", 1)[-1] for v in model.non_trainable_variables} == {"kernel", "bias"}
    assert model.dense1.kernel in model.non_trainable_variables
    assert model.dense2.kernel in model.trainable_variables
    with pytest.raises(HubloadError, match="nope"):
        tf_adapter.freeze(model, ["nope"])
