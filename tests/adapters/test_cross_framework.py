"""The seed example both ways: Keras subclassed MyModel <-> its PyTorch twin, through reader -> layout -> compat -> apply."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")

from hubload.adapters import get_adapter  # noqa: E402
from hubload.compat import check  # noqa: E402
from hubload.errors import IncompatibleWeightsError  # noqa: E402
from hubload.layout import to_canonical  # noqa: E402
from hubload.readers import open_checkpoint  # noqa: E402
from tests.seed_models import IN_FEATURES, MyModel, TorchMyModel  # noqa: E402


@pytest.fixture
def x():
    return np.random.default_rng(0).random((5, IN_FEATURES), dtype=np.float32)


def _built_keras(x) -> MyModel:
    model = MyModel()
    model(x)
    return model


def _load(model, path, **options):
    """The whole pipeline: reader -> canonical layout -> compat report -> adapter.apply."""
    adapter = get_adapter(model)
    with open_checkpoint(path) as reader:
        ckpt = to_canonical(reader.tensors(), reader.layout)
        report = check(ckpt, adapter.spec(model), source=str(path), target=type(model).__name__)
        report.raise_if_incompatible()
        adapter.apply(model, report, reader, **options)
    return report


def _trained_checkpoint(tmp_path, x):
    """A Keras MyModel trained one step with Adam, saved with tf.train.Checkpoint(model, optimizer)."""
    model = _built_keras(x)
    optimizer = keras.optimizers.Adam(learning_rate=0.01)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "ckpt" / "c"))
    return model, prefix


def test_tf_checkpoint_loads_into_torch_twin(tmp_path, x):
    keras_model, prefix = _trained_checkpoint(tmp_path, x)
    torch_model = TorchMyModel()

    report = _load(torch_model, prefix)

    assert report.ok and len(report.matched) == 4
    assert {m.rule for m in report.matched if m.key.endswith("weight")} == {"dense-kernel"}
    with torch.no_grad():
        got = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(keras_model(x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torch_state_dict_loads_into_keras_model(tmp_path, x, suffix):
    torch_model = TorchMyModel()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(torch_model.state_dict(), path)
    else:
        safetensors_torch.save_file(torch_model.state_dict(), str(path))
    keras_model = _built_keras(x)

    report = _load(keras_model, path)

    assert report.ok and len(report.matched) == 4
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras_model(x)), want, rtol=0, atol=1e-6)
    # The kernel really was transposed, not just reshaped.
    np.testing.assert_array_equal(keras_model.dense1.kernel.numpy(), torch_model.dense1.weight.detach().numpy().T)


def test_round_trip_keras_torch_keras(tmp_path, x):
    keras_model, prefix = _trained_checkpoint(tmp_path, x)
    torch_model = TorchMyModel()
    _load(torch_model, prefix)
    path = tmp_path / "back.safetensors"
    safetensors_torch.save_file(torch_model.state_dict(), str(path))
    fresh = _built_keras(x)

    _load(fresh, path)

    for a, b in zip(keras_model.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_shape_mismatch_from_tf_checkpoint_leaves_torch_model_untouched(tmp_path, x):
    _, prefix = _trained_checkpoint(tmp_path, x)
    torch_model = TorchMyModel(hidden=32)
    before = {k: v.clone() for k, v in torch_model.state_dict().items()}

    with pytest.raises(IncompatibleWeightsError) as info:
        _load(torch_model, prefix)

    msg = str(info.value)
    assert "dense1.weight" in msg and "[64, 8]" in msg and "[32, 8]" in msg
    after = torch_model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_torch_checkpoint_into_meta_model_from_tf_source(tmp_path, x):
    keras_model, prefix = _trained_checkpoint(tmp_path, x)
    with torch.device("meta"):
        torch_model = TorchMyModel()

    _load(torch_model, prefix)

    assert not any(p.is_meta for p in torch_model.parameters())
    with torch.no_grad():
        got = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(keras_model(x)), rtol=0, atol=1e-6)


class _TorchTagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(6, 6)  # square, and no "embed" in its name: a name-based guess would fail
        self.head = torch.nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.tok(ids))


class _KerasTagger(keras.Model):
    def __init__(self):
        super().__init__()
        self.tok = keras.layers.Embedding(6, 6)
        self.head = keras.layers.Dense(3)

    def call(self, ids):
        return self.head(self.tok(ids))


def test_convert_to_keras_layout_named_by_the_model_needs_no_guess(tmp_path):
    import hubload

    torch.manual_seed(0)
    src = _TorchTagger()
    safetensors_torch.save_file(src.state_dict(), str(tmp_path / "t.safetensors"))
    ids = np.array([[0, 3, 5, 1]])
    like = _KerasTagger()
    like(ids)
    summary = hubload.convert(tmp_path / "t.safetensors", layout="keras", out=tmp_path / "k.safetensors", model=like)
    assert set(summary["names"].values()) == {"tok/embeddings", "head/kernel", "head/bias"}
    with open_checkpoint(tmp_path / "k.safetensors") as reader:
        shapes = {k: tuple(v.shape) for k, v in reader.tensors().items()}
    assert shapes["head/kernel"] == (6, 3)  # Keras [in, out]
    target = _KerasTagger()
    target(ids)
    hubload.load(tmp_path / "k.safetensors", model=target)
    with torch.no_grad():
        want = src(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(target(ids)), want, rtol=0, atol=1e-6)
    with pytest.raises(hubload.UsageError, match="Keras model"):
        hubload.convert(tmp_path / "t.safetensors", layout="keras", out=tmp_path / "x.safetensors", model=src)
