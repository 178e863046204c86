"""``hubload.convert`` / ``hubload convert``: re-lay a checkpoint out for the other convention.

The first half needs only numpy (the core path); the round trips through real models import torch and
Keras with ``pytest.importorskip``.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import hubload
from hubload.cli import cli
from hubload.relayout import convert, keras_leaf_hint, write_safetensors
from hubload.errors import HubloadError
from hubload.readers import open_checkpoint

np = pytest.importorskip("numpy")


@pytest.mark.parametrize("name,ndim,leaf", [
    ("fc.weight", 2, "kernel"),
    ("conv1.weight", 4, "kernel"),
    ("conv.weight", 3, "kernel"),
    ("bn1.weight", 1, "gamma"),
    ("encoder.LayerNorm.weight", 1, "gamma"),
    ("embeddings.word_embeddings.weight", 2, "embeddings"),
    ("fc.bias", 1, "bias"),
    ("bn1.running_mean", 1, "moving_mean"),
    ("bn1.running_var", 1, "moving_variance"),
    ("bn1.num_batches_tracked", 0, None),
])
def test_keras_leaf_hint(name, ndim, leaf):
    assert keras_leaf_hint(name, ndim) == leaf


@pytest.fixture()
def torch_layout_file(tmp_path):
    """A torch-convention checkpoint (conv + BatchNorm + embedding + linear), written with numpy only."""
    rng = np.random.default_rng(0)
    arrays = {
        "conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "bn1.weight": rng.random(4).astype(np.float32),
        "bn1.bias": rng.standard_normal(4).astype(np.float32),
        "bn1.running_mean": rng.standard_normal(4).astype(np.float32),
        "bn1.running_var": rng.random(4).astype(np.float32) + 0.5,
        "bn1.num_batches_tracked": np.array(7, dtype=np.int64),
        "emb.word_embeddings.weight": rng.standard_normal((10, 4)).astype(np.float32),
        "fc.weight": rng.standard_normal((5, 4)).astype(np.float32),
        "fc.bias": rng.standard_normal(5).astype(np.float32),
    }
    path = tmp_path / "torch.safetensors"
    write_safetensors(path, arrays, {"format": "pt"})
    return path, arrays


def test_write_safetensors_round_trips_through_the_reader(tmp_path, torch_layout_file):
    path, arrays = torch_layout_file
    with open_checkpoint(path) as reader:
        assert reader.metadata == {"format": "pt"}
        assert {k: (tuple(t.shape), t.dtype) for k, t in reader.tensors().items()} == {
            k: (a.shape, str(a.dtype)) for k, a in arrays.items()}
        for k, a in arrays.items():
            np.testing.assert_array_equal(reader.get(k), a)


def test_convert_to_keras_and_back_is_lossless_and_reports_dropped(tmp_path, torch_layout_file):
    path, arrays = torch_layout_file
    out = tmp_path / "keras.safetensors"
    summary = convert(str(path), layout="keras", out=out)
    assert summary["layout"] == "keras" and summary["tensors"] == len(arrays) - 1
    assert summary["dropped"] == {"bn1.num_batches_tracked": "no Keras counterpart"}
    assert summary["bytes"] == out.stat().st_size
    assert summary["names"]["conv1.weight"] == "conv1/kernel" and summary["names"]["bn1.bias"] == "bn1/beta"

    with open_checkpoint(out) as reader:
        metadata = dict(reader.metadata)
        got = {k: np.array(reader.get(k)) for k in reader.tensors()}
    assert metadata["hubload_layout"] == "keras" and metadata["converted_from"] == str(path)
    assert set(got) == {"conv1/kernel", "bn1/gamma", "bn1/beta", "bn1/moving_mean", "bn1/moving_variance",
                        "emb/word_embeddings/embeddings", "fc/kernel", "fc/bias"}
    np.testing.assert_array_equal(got["conv1/kernel"], arrays["conv1.weight"].transpose(2, 3, 1, 0))  # OIHW->HWIO
    np.testing.assert_array_equal(got["fc/kernel"], arrays["fc.weight"].T)
    np.testing.assert_array_equal(got["bn1/moving_variance"], arrays["bn1.running_var"])
    np.testing.assert_array_equal(got["emb/word_embeddings/embeddings"], arrays["emb.word_embeddings.weight"])

    back = tmp_path / "back.safetensors"
    summary = convert(str(out), layout="torch", out=back)  # the file's own metadata says it is Keras
    assert summary["dropped"] == {}
    with open_checkpoint(back) as reader:
        restored = {k: np.array(reader.get(k)) for k in reader.tensors()}
    expected = {k: a for k, a in arrays.items() if k != "bn1.num_batches_tracked"}
    assert restored.keys() == expected.keys()
    for k, a in expected.items():
        np.testing.assert_array_equal(restored[k], a, err_msg=k)


def test_safetensors_reader_reports_the_declared_layout(tmp_path, torch_layout_file):
    path, _ = torch_layout_file
    out = tmp_path / "keras.safetensors"
    convert(str(path), layout="keras", out=out)
    with open_checkpoint(out) as reader:
        assert reader.layout == "keras"


def test_convert_rejects_unknown_layout(tmp_path, torch_layout_file):
    with pytest.raises(HubloadError, match="'torch' or 'keras'"):
        convert(str(torch_layout_file[0]), layout="jax", out=tmp_path / "x.safetensors")


def test_cli_convert(tmp_path, torch_layout_file):
    path, arrays = torch_layout_file
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(path), "--layout", "keras", "--out", str(tmp_path / "k.safetensors")])
    assert res.exit_code == 0, res.output
    assert f"wrote {len(arrays) - 1} tensors" in res.stdout and "keras layout" in res.stdout
    assert "dropped bn1.num_batches_tracked: no Keras counterpart" in res.stdout

    res = runner.invoke(cli, ["convert", str(tmp_path / "k.safetensors"), "--layout", "torch", "--out",
                              str(tmp_path / "t.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["tensors"] == len(arrays) - 1 and data["dropped"] == {} and data["layout"] == "torch"

    res = runner.invoke(cli, ["convert", str(tmp_path / "missing.safetensors"), "--layout", "torch", "--out",
                              str(tmp_path / "t2.safetensors")])
    assert res.exit_code == 2 and "missing.safetensors" in res.stderr


# ------------------------------------------------------------------------------------ through real models


@pytest.fixture(scope="module")
def fw():
    """torch and Keras, plus a tiny conv net in each with the same canonical names."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    torch = pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    class KerasNet(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3)
            self.bn = keras.layers.BatchNormalization(epsilon=1e-5)
            self.fc = keras.layers.Dense(5)

        def call(self, x):
            return self.fc(keras.ops.mean(keras.ops.relu(self.bn(self.conv(x), training=False)), axis=(1, 2)))

    def keras_net():
        net = KerasNet()
        net(np.zeros((1, 6, 6, 3), np.float32))
        return net

    return torch, keras, TorchNet, keras_net


def _torch_source(torch, TorchNet):
    torch.manual_seed(0)
    net = TorchNet()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.randn(4))
        net.bn.running_var.copy_(torch.rand(4) + 0.5)
        net.bn.num_batches_tracked.fill_(3)
    return net.eval()


def test_torch_checkpoint_converted_to_keras_loads_into_keras_model(fw, tmp_path):
    torch, keras, TorchNet, keras_net = fw
    from safetensors.torch import save_file

    src = _torch_source(torch, TorchNet)
    save_file(src.state_dict(), tmp_path / "torch.safetensors")
    summary = convert(str(tmp_path / "torch.safetensors"), layout="keras", out=tmp_path / "keras.safetensors")
    assert summary["dropped"] == {"bn.num_batches_tracked": "no Keras counterpart"}

    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ref = src(torch.from_numpy(x)).numpy()
    model, report = hubload.load(str(tmp_path / "keras.safetensors"), model=keras_net(), return_report=True)
    assert report.ok and len(report.matched) == 8
    got = keras.ops.convert_to_numpy(model(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # By Keras name, too: each variable's path ends in the name the file stores for it.
    with open_checkpoint(tmp_path / "keras.safetensors") as reader:
        stored = {k: np.array(reader.get(k)) for k in reader.tensors()}
    fresh = keras_net()
    by_attr = {"conv/kernel": fresh.conv.kernel, "conv/bias": fresh.conv.bias, "bn/gamma": fresh.bn.gamma,
               "bn/beta": fresh.bn.beta, "bn/moving_mean": fresh.bn.moving_mean,
               "bn/moving_variance": fresh.bn.moving_variance, "fc/kernel": fresh.fc.kernel, "fc/bias": fresh.fc.bias}
    assert set(stored) == set(by_attr)
    for name, var in by_attr.items():
        var.assign(stored[name])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fresh(x.transpose(0, 2, 3, 1))), ref, rtol=0, atol=1e-5)


def test_keras_weights_converted_to_torch_load_into_torch_model(fw, tmp_path):
    torch, keras, TorchNet, keras_net = fw
    keras.utils.set_random_seed(2)
    src = keras_net()
    bn = src.bn
    bn.moving_mean.assign(np.random.default_rng(3).standard_normal(4).astype(np.float32))
    bn.moving_variance.assign(np.random.default_rng(4).random(4).astype(np.float32) + 0.5)
    src.save_weights(str(tmp_path / "net.weights.h5"))
    summary = convert(str(tmp_path / "net.weights.h5"), layout="torch", out=tmp_path / "torch.safetensors")
    assert summary["tensors"] == 8 and summary["dropped"] == {}
    with open_checkpoint(tmp_path / "torch.safetensors") as reader:
        assert set(reader.tensors()) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                         "bn.running_var", "fc.weight", "fc.bias"}

    x = np.random.default_rng(5).standard_normal((2, 6, 6, 3)).astype(np.float32)
    ref = keras.ops.convert_to_numpy(src(x))
    # torch's own loader: the torch-layout file is a plain state_dict (only the BatchNorm counter is absent).
    from safetensors.torch import load_file

    model = TorchNet().eval()
    result = model.load_state_dict(load_file(tmp_path / "torch.safetensors"), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"bn.num_batches_tracked"}
    with torch.no_grad():
        got = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("source", ["keras-layout", "torch-layout"])
def test_converted_checkpoint_without_batchnorm_counter_loads_into_torch(fw, tmp_path, source):
    torch, keras, TorchNet, keras_net = fw
    from safetensors.torch import save_file

    src = _torch_source(torch, TorchNet)
    save_file(src.state_dict(), tmp_path / "torch.safetensors")
    convert(str(tmp_path / "torch.safetensors"), layout="keras", out=tmp_path / "keras-layout.safetensors")
    convert(str(tmp_path / "keras-layout.safetensors"), layout="torch", out=tmp_path / "torch-layout.safetensors")
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ref = src(torch.from_numpy(x)).numpy()
    model, report = hubload.load(str(tmp_path / f"{source}.safetensors"), model=TorchNet().eval(),
                                 return_report=True)
    # The checkpoint has no num_batches_tracked; the model's counter is reported, not silently skipped.
    assert report.ok and [i.key for i in report.ignored] == ["bn.num_batches_tracked"]
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), ref, rtol=0, atol=1e-6)
