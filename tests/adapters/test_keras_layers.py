"""The Keras layer specs, each checked both ways numerically against the equivalent torch module.

torch -> Keras: the torch module's ``state_dict`` as safetensors, ``hubload.load`` into a Keras model.
Keras -> torch: the Keras model's ``save_weights`` file, ``hubload.convert`` to the torch layout, then torch's
own ``load_state_dict(strict=True)``. Both must give the same outputs within 1e-5.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

import hubload  # noqa: E402
from hubload.relayout import convert, write_safetensors  # noqa: E402

L = keras.layers
nn = torch.nn
RNG = np.random.default_rng(0)


class Wrap(nn.Module):
    """Holds the module under test as ``l`` (the Keras layer is named "l"), with an input/output adapter."""

    def __init__(self, module, fwd):
        super().__init__()
        self.l = module
        self._fwd = fwd

    def forward(self, x):
        return self._fwd(self.l, x)


def _cl(f):
    """Run a channels-first torch module on channels-last data."""
    def run(m, x):
        nd = x.dim()
        to_cf = (0, nd - 1, *range(1, nd - 1))
        to_cl = (0, *range(2, nd), 1)
        return f(m, x.permute(*to_cf)).permute(*to_cl)
    return run


def _plain(m, x):
    return m(x)


def _rnn(m, x):
    return m(x)[0]


def _mha(m, x):
    return m(x, x, x, need_weights=False)[0]


class SeparableTorch(nn.Module):
    """A separable conv as torch writes it: depthwise (groups=in) then pointwise 1x1."""

    def __init__(self, conv, cin, cout, k, mult=1):
        super().__init__()
        self.depthwise = conv(cin, cin * mult, k, groups=cin, bias=False)
        self.pointwise = conv(cin * mult, cout, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class SeparateAttention(nn.Module):
    """Attention with separate q/k/v/out Linear layers named as the Keras sublayers."""

    def __init__(self, e, heads):
        super().__init__()
        self.heads = heads
        self.query_dense, self.key_dense, self.value_dense, self.output_dense = (nn.Linear(e, e) for _ in range(4))

    def forward(self, x):
        b, t, e = x.shape
        h = self.heads

        def split(y):
            return y.reshape(b, t, h, e // h).transpose(1, 2)

        att = torch.nn.functional.scaled_dot_product_attention(split(self.query_dense(x)), split(self.key_dense(x)),
                                                               split(self.value_dense(x)))
        return self.output_dense(att.transpose(1, 2).reshape(b, t, e))


class NormalizationTorch(nn.Module):
    """keras.layers.Normalization's arithmetic with its three variables as buffers."""

    def __init__(self, c):
        super().__init__()
        for name in ("mean", "variance"):
            self.register_buffer(name, torch.zeros(c))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return (x - self.mean) / torch.clamp(torch.sqrt(self.variance), min=1e-7)


def _adapted_normalization():
    layer = L.Normalization(name="l")
    layer.adapt(RNG.standard_normal((16, 4)).astype(np.float32))
    return layer


def _einsum_torch():
    return Wrap(nn.Linear(4, 6), lambda m, x: m(x).reshape(x.shape[0], 2, 3))


def _case(name, keras_layer, torch_module, shape, fwd=_plain, *, dtype="float32", keras_to_torch=True):
    return pytest.param(keras_layer, torch_module, shape, fwd, dtype, keras_to_torch, id=name)


CASES = [
    _case("Dense", lambda: L.Dense(3, name="l"), lambda: nn.Linear(4, 3), (2, 4)),
    # A standalone EinsumDense kernel's axes are known only from its equation, which a .weights.h5 lacks; the
    # file side is covered inside MultiHeadAttention below.
    _case("EinsumDense", lambda: L.EinsumDense("ab,bcd->acd", (2, 3), bias_axes="cd", name="l"), None, (2, 4),
          keras_to_torch=False),
    _case("Embedding", lambda: L.Embedding(10, 4, name="l"), lambda: nn.Embedding(10, 4), (2, 3), dtype="int32"),
    _case("Conv1D", lambda: L.Conv1D(3, 2, name="l"), lambda: nn.Conv1d(4, 3, 2), (2, 5, 4), _cl(lambda m, x: m(x))),
    _case("Conv2D", lambda: L.Conv2D(3, 2, name="l"), lambda: nn.Conv2d(4, 3, 2), (2, 5, 5, 4), _cl(lambda m, x: m(x))),
    _case("Conv3D", lambda: L.Conv3D(3, 2, name="l"), lambda: nn.Conv3d(4, 3, 2), (1, 4, 4, 4, 4),
          _cl(lambda m, x: m(x))),
    _case("Conv1DTranspose", lambda: L.Conv1DTranspose(3, 2, name="l"), lambda: nn.ConvTranspose1d(4, 3, 2),
          (2, 5, 4), _cl(lambda m, x: m(x))),
    _case("Conv2DTranspose", lambda: L.Conv2DTranspose(3, 2, name="l"), lambda: nn.ConvTranspose2d(4, 3, 2),
          (2, 4, 4, 4), _cl(lambda m, x: m(x))),
    _case("Conv3DTranspose", lambda: L.Conv3DTranspose(3, 2, name="l"), lambda: nn.ConvTranspose3d(4, 3, 2),
          (1, 3, 3, 3, 4), _cl(lambda m, x: m(x))),
    _case("DepthwiseConv1D", lambda: L.DepthwiseConv1D(3, depth_multiplier=2, name="l"),
          lambda: nn.Conv1d(4, 8, 3, groups=4), (2, 6, 4), _cl(lambda m, x: m(x))),
    _case("DepthwiseConv2D", lambda: L.DepthwiseConv2D(3, depth_multiplier=2, name="l"),
          lambda: nn.Conv2d(4, 8, 3, groups=4), (2, 5, 5, 4), _cl(lambda m, x: m(x))),
    _case("SeparableConv1D", lambda: L.SeparableConv1D(3, 3, depth_multiplier=2, name="l"),
          lambda: SeparableTorch(nn.Conv1d, 4, 3, 3, 2), (2, 6, 4), _cl(lambda m, x: m(x))),
    _case("SeparableConv2D", lambda: L.SeparableConv2D(3, 3, name="l"),
          lambda: SeparableTorch(nn.Conv2d, 4, 3, 3), (2, 5, 5, 4), _cl(lambda m, x: m(x))),
    _case("BatchNormalization", lambda: L.BatchNormalization(epsilon=1e-3, name="l"),
          lambda: nn.BatchNorm2d(4, eps=1e-3).eval(), (2, 3, 3, 4), _cl(lambda m, x: m(x))),
    _case("LayerNormalization", lambda: L.LayerNormalization(epsilon=1e-5, name="l"),
          lambda: nn.LayerNorm(4, eps=1e-5), (2, 3, 4)),
    _case("GroupNormalization", lambda: L.GroupNormalization(2, epsilon=1e-5, name="l"),
          lambda: nn.GroupNorm(2, 4, eps=1e-5), (2, 3, 3, 4), _cl(lambda m, x: m(x))),
    _case("RMSNormalization", lambda: L.RMSNormalization(epsilon=1e-6, name="l"),
          lambda: nn.RMSNorm(4, eps=1e-6), (2, 3, 4)),
    _case("PReLU", lambda: L.PReLU(shared_axes=[1, 2], name="l"), lambda: nn.PReLU(4), (2, 3, 3, 4),
          _cl(lambda m, x: m(x))),
    _case("Normalization", lambda: _adapted_normalization(),
          lambda: NormalizationTorch(4), (2, 4)),
    _case("MultiHeadAttention-separate", lambda: L.MultiHeadAttention(2, 2, name="l"),
          lambda: SeparateAttention(4, 2), (2, 3, 4)),
    # nn.MultiheadAttention's packed in_proj_weight: the checker picks the packed form from the checkpoint.
    _case("MultiHeadAttention-packed", lambda: L.MultiHeadAttention(2, 2, name="l"),
          lambda: nn.MultiheadAttention(4, 2, batch_first=True), (2, 3, 4), _mha, keras_to_torch=False),
    _case("LSTM", lambda: L.LSTM(3, return_sequences=True, name="l"), lambda: nn.LSTM(4, 3, batch_first=True),
          (2, 5, 4), _rnn),
    _case("GRU", lambda: L.GRU(3, return_sequences=True, name="l"), lambda: nn.GRU(4, 3, batch_first=True),
          (2, 5, 4), _rnn),
    _case("SimpleRNN", lambda: L.SimpleRNN(3, return_sequences=True, name="l"),
          lambda: nn.RNN(4, 3, batch_first=True), (2, 5, 4), _rnn),
    _case("Bidirectional-LSTM", lambda: L.Bidirectional(L.LSTM(3, return_sequences=True), name="l"),
          lambda: nn.LSTM(4, 3, batch_first=True, bidirectional=True), (2, 5, 4), _rnn),
    _case("Bidirectional-GRU", lambda: L.Bidirectional(L.GRU(3, return_sequences=True), name="l"),
          lambda: nn.GRU(4, 3, batch_first=True, bidirectional=True), (2, 5, 4), _rnn),
]


def _keras_model(make, shape, dtype):
    inp = keras.Input(shape[1:], dtype=dtype)
    layer = make()
    out = layer(inp, inp) if isinstance(layer, L.MultiHeadAttention) else layer(inp)
    return keras.Model(inp, out)


def _randomize_torch(module):
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                values = torch.from_numpy(RNG.standard_normal(tuple(t.shape)).astype(np.float32))
                if "var" in name:
                    values = values.abs() + 0.5
                t.copy_(values)
            elif name.endswith("count"):
                t.fill_(7)


def _randomize_keras(model):
    for v in model.weights:
        values = RNG.standard_normal(tuple(v.shape)).astype(v.dtype)
        if "variance" in v.path:
            values = np.abs(values) + 0.5
        v.assign(values if np.issubdtype(values.dtype, np.floating) else np.full(v.shape, 7, v.dtype))
    for layer in model.layers:
        if isinstance(layer, L.Normalization):
            layer.finalize_state()  # it caches mean/variance; Keras' own loader calls this too


def _input(shape, dtype):
    if dtype == "int32":
        return RNG.integers(0, 10, shape).astype(np.int32)
    return RNG.standard_normal(shape).astype(np.float32)


def _torch_run(module, fwd, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize(("make_keras", "make_torch", "shape", "fwd", "dtype", "keras_to_torch"), CASES)
def test_torch_module_loads_into_keras_layer(tmp_path, make_keras, make_torch, shape, fwd, dtype, keras_to_torch):
    if make_torch is None:
        src, fwd = _einsum_torch(), lambda m, x: m(x)
    else:
        src = Wrap(make_torch(), fwd)
    _randomize_torch(src)
    path = tmp_path / "torch.safetensors"
    write_safetensors(path, {k: v.numpy() for k, v in src.state_dict().items()})
    model = _keras_model(make_keras, shape, dtype)
    hubload.load(str(path), model=model)
    x = _input(shape, dtype)
    got = keras.ops.convert_to_numpy(model(x))
    src.eval()
    with torch.no_grad():
        ref = src(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("make_keras", "make_torch", "shape", "fwd", "dtype", "keras_to_torch"),
                         [c for c in CASES if c.values[5]])
def test_keras_layer_converts_to_torch_module(tmp_path, make_keras, make_torch, shape, fwd, dtype, keras_to_torch):
    model = _keras_model(make_keras, shape, dtype)
    _randomize_keras(model)
    model.save_weights(str(tmp_path / "k.weights.h5"))
    convert(str(tmp_path / "k.weights.h5"), layout="torch", out=tmp_path / "t.safetensors")
    from safetensors.torch import load_file

    dst = Wrap(make_torch(), fwd)
    dst.load_state_dict(load_file(str(tmp_path / "t.safetensors")), strict=True)
    dst.eval()
    x = _input(shape, dtype)
    np.testing.assert_allclose(_torch_run(dst, fwd, x), keras.ops.convert_to_numpy(model(x)), rtol=0, atol=1e-5)


def test_gru_without_reset_after_keeps_keras_names():
    """torch's GRU applies the recurrent bias after the reset gate; reset_after=False has no torch form."""
    from hubload.adapters import tf as tf_adapter

    model = _keras_model(lambda: L.GRU(3, reset_after=False, name="l"), (2, 5, 4), "float32")
    names = set(tf_adapter.spec(model))
    assert names == {"l.cell.kernel", "l.cell.recurrent_kernel", "l.cell.bias"}
