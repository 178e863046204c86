"""Canonical layout: the Keras rule table both ways, transforms, renames, key normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubload.errors import CheckpointError, RegistryError
from hubload.layout import (
    KERAS_RULES,
    CanonicalTensor,
    Transform,
    align_prefixes,
    apply_rename,
    apply_transform,
    canonical_to_keras,
    compile_rename_rules,
    from_canonical,
    ignorable_reason,
    keras_name_to_canonical,
    normalize_keras_path,
    strip_wrapper_prefixes,
    to_canonical,
)
from hubload.readers import TensorInfo


def _info(name, shape, dtype="float32"):
    return TensorInfo(name, tuple(shape), dtype, int(np.prod(shape)) * 4)


# ------------------------------------------------------------------------------ rules, both directions


@st.composite
def rule_and_shape(draw):
    rule = draw(st.sampled_from(KERAS_RULES))
    ndim = rule.ndim if rule.ndim is not None else draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    return rule, shape


@settings(max_examples=150, deadline=None)
@given(rule_and_shape())
def test_every_rule_round_trips(case):
    rule, shape = case
    keras = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    path = f"block/0/{rule.keras_leaf}"
    name, fwd, fired = keras_name_to_canonical(path, shape, rule=rule.name)
    assert fired == rule.name
    assert name == f"block.0.{rule.torch_leaf}"
    canonical = apply_transform(keras, fwd)
    assert canonical.shape == (fwd.out_shape(shape) if fwd else shape)
    assert canonical.size == keras.size
    # reverse direction: from the canonical tensor back to the Keras variable
    back_path, inv, back_rule = canonical_to_keras(name, canonical.shape, rule.keras_leaf, keras_shape=shape,
                                                   rule=rule.name)
    assert back_path == path and back_rule == rule.name
    np.testing.assert_array_equal(apply_transform(canonical, inv), keras)
    if fwd is not None:
        np.testing.assert_array_equal(fwd.inverse().apply(canonical), keras)
        assert fwd.inverse().inverse().out_shape(shape) == fwd.out_shape(shape)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=5).flatmap(
    lambda shape: st.tuples(st.just(tuple(shape)), st.permutations(range(len(shape))), st.booleans())))
def test_random_transforms_invert(case):
    shape, perm, merge = case
    perm = tuple(perm)
    permuted = tuple(shape[i] for i in perm)
    t = (Transform(perm=perm, reshape=(permuted[0] * permuted[1], *permuted[2:]), in_shape=shape) if merge
         else Transform(perm=perm))
    a = np.random.default_rng(0).standard_normal(shape)
    b = t.apply(a)
    assert b.shape == t.out_shape(shape)
    np.testing.assert_array_equal(t.inverse().apply(b), a)
    assert Transform.from_dict(t.to_dict()) == t


def test_transform_validation():
    with pytest.raises(ValueError, match="not a permutation"):
        Transform(perm=(0, 0))
    with pytest.raises(ValueError, match="in_shape"):
        Transform(perm=(1, 0), reshape=(4,))
    with pytest.raises(ValueError, match="rank-3"):
        Transform(perm=(1, 0)).out_shape((1, 2, 3))
    assert Transform(perm=(0, 1)).is_identity and not Transform(perm=(1, 0)).is_identity
    assert apply_transform("unchanged", None) == "unchanged"


@pytest.mark.parametrize(
    ("path", "shape", "name", "canon_shape", "rule"),
    [
        ("dense1/kernel", (4, 3), "dense1.weight", (3, 4), "dense-kernel"),
        ("dense1/_kernel", (4, 3), "dense1.weight", (3, 4), "dense-kernel"),
        ("model/dense1/_kernel/.ATTRIBUTES/VARIABLE_VALUE", (4, 3), "dense1.weight", (3, 4), "dense-kernel"),
        ("dense1/kernel:0", (4, 3), "dense1.weight", (3, 4), "dense-kernel"),
        ("c/kernel", (5, 2, 7), "c.weight", (7, 2, 5), "conv1d-kernel"),
        ("c/kernel", (3, 5, 2, 7), "c.weight", (7, 2, 3, 5), "conv2d-kernel"),
        ("c/kernel", (1, 3, 5, 2, 7), "c.weight", (7, 2, 1, 3, 5), "conv3d-kernel"),
        ("sep/depthwise_kernel", (3, 5, 4, 2), "sep.weight", (8, 1, 3, 5), "depthwise-conv2d-kernel"),
        ("bn/gamma", (4,), "bn.weight", (4,), "norm-gamma"),
        ("bn/beta", (4,), "bn.bias", (4,), "norm-beta"),
        ("bn/moving_mean", (4,), "bn.running_mean", (4,), "bn-moving-mean"),
        ("bn/moving_variance", (4,), "bn.running_var", (4,), "bn-moving-variance"),
        ("emb/_embeddings", (10, 4), "emb.weight", (10, 4), "embedding"),
        ("blocks/0/bias", (4,), "blocks.0.bias", (4,), "bias"),
        ("custom/alpha", (2, 3), "custom.alpha", (2, 3), None),
        ("custom/_private", (2,), "custom._private", (2,), None),
    ],
)
def test_keras_name_to_canonical(path, shape, name, canon_shape, rule):
    got_name, t, got_rule = keras_name_to_canonical(path, shape)
    assert (got_name, got_rule) == (name, rule)
    assert (t.out_shape(shape) if t else tuple(shape)) == canon_shape


def test_layer_class_selects_depthwise_rule():
    # Keras 3 names a DepthwiseConv2D kernel "kernel": only the layer class tells it from a Conv2D kernel
    assert keras_name_to_canonical("dw/kernel", (3, 3, 4, 2))[2] == "conv2d-kernel"
    name, t, rule = keras_name_to_canonical("dw/kernel", (3, 3, 4, 2), layer="DepthwiseConv2D")
    assert (name, rule, t.out_shape((3, 3, 4, 2))) == ("dw.weight", "depthwise-conv2d-kernel", (8, 1, 3, 3))
    assert keras_name_to_canonical("up/kernel", (3, 3, 5, 8), layer="conv2d_transpose_1")[2] == \
        "conv2d-transpose-kernel"
    with pytest.raises(ValueError, match="unknown layout rule"):
        keras_name_to_canonical("x/kernel", (2, 2), rule="nope")
    with pytest.raises(ValueError, match="rank-4"):
        keras_name_to_canonical("x/kernel", (2, 2), rule="conv2d-kernel")


def test_canonical_to_keras_needs_keras_shape_for_depthwise():
    with pytest.raises(ValueError, match="keras_shape"):
        canonical_to_keras("dw.weight", (8, 1, 3, 3), "kernel", layer="DepthwiseConv2D")
    with pytest.raises(ValueError, match="does not correspond"):
        canonical_to_keras("d.weight", (3, 4), "kernel", keras_shape=(3, 4))
    # a hint that does not fit the canonical leaf: no rule, name passes through
    assert canonical_to_keras("d.bias", (3,), "gamma") == ("d/gamma", None, None)


def test_normalize_keras_path():
    assert normalize_keras_path("model/a/b/.ATTRIBUTES/VARIABLE_VALUE") == "a/b"
    assert normalize_keras_path("a/b") == "a/b"  # already stripped: the root segment stays


# --------------------------------------------------------------------- numerics against both frameworks

_LAYER_CASES = [
    # (keras layer factory, torch module factory, input shape (keras), channels-last rank or 0)
    ("Dense", lambda k: k.layers.Dense(5), lambda t: t.nn.Linear(4, 5), (2, 4), 0),
    ("Conv1D", lambda k: k.layers.Conv1D(5, 3), lambda t: t.nn.Conv1d(4, 5, 3), (2, 7, 4), 1),
    ("Conv2D", lambda k: k.layers.Conv2D(5, 3), lambda t: t.nn.Conv2d(4, 5, 3), (2, 6, 7, 4), 2),
    ("Conv3D", lambda k: k.layers.Conv3D(3, 2), lambda t: t.nn.Conv3d(4, 3, 2), (1, 3, 4, 5, 4), 3),
    ("DepthwiseConv1D", lambda k: k.layers.DepthwiseConv1D(3, depth_multiplier=2),
     lambda t: t.nn.Conv1d(4, 8, 3, groups=4), (2, 7, 4), 1),
    ("DepthwiseConv2D", lambda k: k.layers.DepthwiseConv2D(3, depth_multiplier=2),
     lambda t: t.nn.Conv2d(4, 8, 3, groups=4), (2, 6, 7, 4), 2),
    ("Conv1DTranspose", lambda k: k.layers.Conv1DTranspose(5, 3, strides=2),
     lambda t: t.nn.ConvTranspose1d(4, 5, 3, stride=2), (2, 5, 4), 1),
    ("Conv2DTranspose", lambda k: k.layers.Conv2DTranspose(5, 3, strides=2),
     lambda t: t.nn.ConvTranspose2d(4, 5, 3, stride=2), (2, 4, 5, 4), 2),
    ("BatchNormalization", lambda k: k.layers.BatchNormalization(epsilon=1e-3),
     lambda t: t.nn.BatchNorm2d(4, eps=1e-3), (2, 3, 3, 4), 2),
    ("LayerNormalization", lambda k: k.layers.LayerNormalization(epsilon=1e-3),
     lambda t: t.nn.LayerNorm(4, eps=1e-3), (2, 3, 4), 0),
    ("Embedding", lambda k: k.layers.Embedding(10, 4), lambda t: t.nn.Embedding(10, 4), (2, 3), 0),
]


@pytest.fixture(scope="module")
def frameworks():
    keras = pytest.importorskip("keras")
    torch = pytest.importorskip("torch")
    return keras, torch


@pytest.mark.parametrize("case", _LAYER_CASES, ids=[c[0] for c in _LAYER_CASES])
def test_rules_reproduce_keras_outputs_in_torch(frameworks, case):
    keras, torch = frameworks
    cls, make_keras, make_torch, in_shape, spatial = case
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 10, in_shape) if cls == "Embedding" else rng.standard_normal(in_shape)).astype(
        "int32" if cls == "Embedding" else "float32")
    layer = make_keras(keras)
    layer.build(in_shape)
    weights = [rng.standard_normal(tuple(v.shape)).astype("float32") for v in layer.weights]
    if cls == "BatchNormalization":
        weights[3] = np.abs(weights[3]) + 0.5  # a variance
    layer.set_weights(weights)
    expected = keras.ops.convert_to_numpy(layer(x, training=False))

    state = {}
    for var, value in zip(layer.weights, weights):
        name, t, _rule = keras_name_to_canonical(var.name, value.shape, layer=cls)
        state[name] = torch.from_numpy(np.ascontiguousarray(apply_transform(value, t)))
        # and back: canonical -> keras restores the Keras array exactly
        _, inv, _ = canonical_to_keras(name, tuple(state[name].shape), var.name, keras_shape=value.shape, layer=cls)
        np.testing.assert_array_equal(apply_transform(state[name].numpy(), inv), value)
    module = make_torch(torch).eval()
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert [m for m in missing if not m.endswith("num_batches_tracked")] == [] and unexpected == []

    tx = torch.from_numpy(x)
    if spatial:  # channels-last -> channels-first
        tx = tx.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    with torch.no_grad():
        out = module(tx.long() if cls == "Embedding" else tx).numpy()
    if spatial:
        out = out.transpose(0, *range(2, out.ndim), 1)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- to_canonical


def test_to_canonical_keras_layout():
    tensors = {
        "model/d/_kernel/.ATTRIBUTES/VARIABLE_VALUE": _info("x", (4, 3)),
        "d/bias": _info("d/bias", (3,), "float16"),
        "dw/kernel": _info("dw/kernel", (3, 3, 4, 2)),
    }
    out = to_canonical(tensors, "keras", layer_kinds={"dw/kernel": "depthwise_conv2d"})
    assert list(out) == ["d.weight", "d.bias", "dw.weight"]
    assert out["d.weight"] == CanonicalTensor("d.weight", "model/d/_kernel/.ATTRIBUTES/VARIABLE_VALUE", (3, 4),
                                              "float32", Transform(perm=(1, 0)), "dense-kernel")
    assert out["d.bias"].dtype == "float16" and out["d.bias"].transform is None
    assert out["dw.weight"].shape == (8, 1, 3, 3)
    forced = to_canonical({"dw/kernel": _info("dw/kernel", (3, 3, 4, 2))}, "keras",
                          forced_rules={"dw/*": "depthwise-conv2d-kernel"})
    assert forced["dw.weight"].rule == "depthwise-conv2d-kernel"


def test_to_canonical_torch_layout_and_rename():
    tensors = {"bert.encoder.layer.0.attention.self.query.weight": _info("q", (4, 4)),
               "bert.pooler.dense.bias": _info("b", (4,))}
    out = to_canonical(tensors, "torch", rename=[{"pattern": r"^bert\.", "replace": ""},
                                                 (r"layer\.(\d+)\.", r"layers.\1.")])
    assert list(out) == ["encoder.layers.0.attention.self.query.weight", "pooler.dense.bias"]
    assert out["pooler.dense.bias"].source == "bert.pooler.dense.bias"
    assert all(t.transform is None and t.rule is None for t in out.values())
    with pytest.raises(ValueError, match="layout must be"):
        to_canonical(tensors, "jax")


def test_to_canonical_collision_is_an_error():
    tensors = {"d/kernel": _info("a", (2, 2)), "d/_kernel": _info("b", (2, 2))}
    with pytest.raises(CheckpointError, match="both map to canonical name 'd.weight'"):
        to_canonical(tensors, "keras")


def test_from_canonical():
    out = from_canonical({"d.weight": _info("d.weight", (3, 4)), "n.weight": _info("n.weight", (3,))},
                         {"d.weight": "kernel", "n.weight": "gamma"})
    assert out["d.weight"] == ("d/kernel", Transform(perm=(1, 0)), "dense-kernel")
    assert out["n.weight"] == ("n/gamma", None, "norm-gamma")


# ----------------------------------------------------------------------------------------- renames


def test_rename_rules_apply_in_order():
    rules = compile_rename_rules([{"pattern": "a", "replace": "b"}, ("b", "c")])
    assert apply_rename("xa", rules) == "xc"
    assert compile_rename_rules(rules) == rules  # already compiled rules pass through


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"pattern": "(unclosed", "replace": "x"}], "invalid regex '\\(unclosed'"),
        ([{"pattern": "a", "replace": r"\1"}], "invalid replacement"),
        ([{"pattern": "(?P<x>a)", "replace": r"\g<y>"}], "invalid replacement"),
        ([{"pattern": "a"}], "exactly the keys"),
        (["just a string"], "must be"),
        ([(1, "x")], "must be strings"),
    ],
)
def test_bad_rename_rules(rules, message):
    with pytest.raises(RegistryError, match=message) as exc:
        compile_rename_rules(rules)
    assert exc.value.field == "rename"


# ---------------------------------------------------------------------------------- normalisation


def test_strip_wrapper_prefixes():
    mapping, changed = strip_wrapper_prefixes(["module.a.weight", "_orig_mod.module.b", "c"])
    assert mapping == {"a.weight": "module.a.weight", "b": "_orig_mod.module.b", "c": "c"}
    assert changed == 2
    # a stripped name that collides with a plain one keeps its spelling
    mapping, changed = strip_wrapper_prefixes(["module.a", "a"])
    assert mapping == {"module.a": "module.a", "a": "a"} and changed == 0


def test_align_prefixes_strip_and_add():
    model = [f"encoder.{i}.weight" for i in range(10)] + ["classifier.weight"]
    ckpt = [f"bert.encoder.{i}.weight" for i in range(10)] + ["cls.predictions.bias"]
    al = align_prefixes(ckpt, model)
    assert (al.action, al.prefix, al.count) == ("strip", "bert.", 10)
    assert al.mapping["encoder.3.weight"] == "bert.encoder.3.weight"
    assert al.mapping["cls.predictions.bias"] == "cls.predictions.bias"
    assert al.describe() == "stripped 'bert.' from 10 checkpoint keys"

    al = align_prefixes(model[:-1], ckpt)  # checkpoint of the base model, model with the prefix
    assert (al.action, al.prefix, al.count) == ("add", "bert.", 10)
    assert al.describe() == "added 'bert.' to 10 checkpoint keys"


def test_align_prefixes_finds_prefixes_with_dots_and_several_segments():
    """A Keras base model's layer name may hold dots (keras.applications' ``mobilenetv2_1.00_224``), and a base
    model may sit two levels down: the prefix comes from the names that line up, not the first dot."""
    base = [f"Conv{i}.weight" for i in range(12)] + ["bn.running_var"]
    wrapped = [f"mobilenetv2_1.00_224.{n}" for n in base] + ["head.weight", "head.bias"]
    al = align_prefixes(base, wrapped)
    assert (al.action, al.prefix, al.count) == ("add", "mobilenetv2_1.00_224.", 13)
    al = align_prefixes(wrapped, base)
    assert (al.action, al.prefix, al.count) == ("strip", "mobilenetv2_1.00_224.", 13)
    assert al.mapping["head.weight"] == "head.weight"
    deep = [f"model.backbone.{n}" for n in base]
    assert align_prefixes(deep, base).prefix == "model.backbone."


def test_align_prefixes_leaves_matching_names_alone():
    names = [f"layer.{i}" for i in range(20)]
    al = align_prefixes(names, names + ["extra.x"])
    assert al.action is None and al.mapping == {n: n for n in names} and al.describe() == ""
    # one stray match is not "noticeably more" names lining up among many
    model = [f"m.{i}" for i in range(100)] + ["x.only"]
    ckpt = [f"n.{i}" for i in range(100)] + ["p.x.only"]
    assert align_prefixes(ckpt, model).action is None


def test_ignorable_reason():
    assert "non-persistent" in ignorable_reason("embeddings.position_ids", "checkpoint")
    assert ignorable_reason("bn.num_batches_tracked", "model")
    assert ignorable_reason("h.0.attn.bias", "checkpoint")
    assert ignorable_reason("h.0.attn.bias", "model") is None  # a model parameter the checkpoint lacks
    assert ignorable_reason("encoder.weight", "checkpoint") is None


# ----------------------------------------------------------------------------- per-class Keras specs


def test_rnn_group_round_trips_and_reorders_gru_gates():
    from hubload.keras_layers import rnn_group_for

    rng = np.random.default_rng(0)
    shapes = {"kernel": (4, 9), "recurrent_kernel": (3, 9), "bias": (2, 9)}
    rule, prefix = rnn_group_for("GRUCell", ("bi", "backward_layer", "cell"), shapes)
    assert prefix == ("bi",) and rule.suffix == "_reverse" and rule.two_biases
    keras_arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    canon = rule.to_canonical(keras_arrays)
    assert {k: v.shape for k, v in canon.items()} == rule.canonical_shapes(shapes)
    # Keras gates z, r, h -> torch r, z, n
    np.testing.assert_array_equal(canon["weight_ih_l0_reverse"][:3], keras_arrays["kernel"][:, 3:6].T)
    back = rule.to_keras(canon, shapes)
    for k in shapes:
        np.testing.assert_array_equal(back[k], keras_arrays[k])


def test_lstm_single_bias_splits_and_merges():
    from hubload.keras_layers import rnn_group_for

    shapes = {"kernel": (2, 8), "recurrent_kernel": (2, 8), "bias": (8,)}
    rule, prefix = rnn_group_for("LSTMCell", ("lstm", "cell"), shapes)
    assert prefix == ("lstm",)
    canon = {"weight_ih_l0": np.ones((8, 2)), "weight_hh_l0": np.ones((8, 2)), "bias_ih_l0": np.arange(8.0),
             "bias_hh_l0": np.full(8, 0.5)}
    np.testing.assert_array_equal(rule.to_keras(canon, shapes)["bias"], np.arange(8.0) + 0.5)
    assert rnn_group_for("GRUCell", ("g", "cell"), {"kernel": (2, 6), "recurrent_kernel": (2, 6), "bias": (6,)}) \
        is None  # reset_after=False has no torch form


def test_einsum_kernel_transform_is_invertible():
    from hubload.keras_layers import einsum_kernel_transform

    k = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [heads, head_dim, embed]: in axes 0, 1
    t = einsum_kernel_transform(k.shape, (0, 1))
    w = t.apply(k)
    assert w.shape == (4, 6)
    np.testing.assert_array_equal(w, k.reshape(6, 4).T)
    np.testing.assert_array_equal(t.inverse().apply(w), k)
    assert einsum_kernel_transform((4, 5), (1,)) is None  # a transposed 2-D kernel is not a Linear weight


def test_structural_segments():
    from hubload.keras_layers import container_segments, functional_segments

    assert container_segments(["block", "block_1", "block_2"]) == ["0", "1", "2"]
    assert container_segments(["dense", "layer_normalization"]) == ["dense", "layer_normalization"]
    assert functional_segments([("dense", "dense_7"), ("dense_1", "head")]) == ["dense", "head"]
    assert functional_segments([("dense", "dense_1"), ("dense_1", "dense")]) == ["dense", "dense_1"]
    assert functional_segments([("dense", "x"), ("conv2d", "x")]) == ["dense", "conv2d"]  # a clash: counters


def test_glob_match_agrees_with_fnmatch():
    """The regex-free fast path for ``*suffix``/``prefix*`` globs decides exactly as fnmatchcase does."""
    import fnmatch
    import itertools

    from hubload.keys import glob_match

    names = ["a.position_ids", "position_ids", "x.attn.bias", "x.attn.biasy", "optimizer.vars.0", "optimizer", "",
             "head.weight", "h[1].w", "h1.w", "a*b", "abc?", "abcd", "cls.predictions.bias", "Head.weight"]
    globs = ["*position_ids", "optimizer.*", "*.attn.bias", "head.*", "*", "", "cls.*", "h[1]*", "a*b", "*b?",
             "a?c*", "**", "*x*", "abc?", "*?", "[ab]*", "*]"]
    differ = [(n, g) for n, g in itertools.product(names, globs) if glob_match(n, g) != fnmatch.fnmatchcase(n, g)]
    assert differ == []
