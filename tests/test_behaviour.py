"""hubload.behaviour and hubload.probe, framework-free: padding, activation identification, comparison,
no-reference traps, the flatten-order fix, verification records and registry probes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hubload.behaviour import (
    Difference,
    Event,
    LayerDesc,
    Verification,
    analyse,
    compare,
    first_divergent,
    flatten_fixes,
    identify,
    pad_spec,
    render_padding,
    trap_warnings,
)
from hubload.compat import CompatReport, Match
from hubload.errors import RegistryError
from hubload.probe import check_digest, digest, make_input
from hubload.registry import parse_registry


def test_tf_same_padding_is_asymmetric_at_stride_2_and_symmetric_at_stride_1():
    torch_pad1 = pad_spec("explicit", (3, 3), (2, 2), (1, 1), [(1, 1), (1, 1)])
    tf_same = pad_spec("same", (3, 3), (2, 2), (1, 1))
    assert tf_same != torch_pad1 and tf_same[0] == ((0, 1), (1, 1))  # even sizes: 0 before, 1 after
    assert "(0, 1) on even sizes" in render_padding(tf_same)
    assert pad_spec("same", (3, 3), (1, 1), (1, 1)) == pad_spec("explicit", (3, 3), (1, 1), (1, 1),
                                                                 [(1, 1), (1, 1)])
    assert pad_spec("same", (3,), (1,), (2,)) == pad_spec("explicit", (3,), (1,), (2,), [(2, 2)])  # dilation
    assert pad_spec("valid", (1, 1), (2, 2), (1, 1)) == pad_spec("same", (1, 1), (2, 2), (1, 1))


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu", "gelu_tanh", "sigmoid", "silu", "softmax"])
def test_identify_names_the_function_between_two_layers(name):
    from hubload.behaviour import _candidates

    y = np.random.default_rng(0).uniform(-3, 3, size=(4, 32))
    x = _candidates()[name](y).astype(np.float32)
    found = identify(y.astype(np.float32), x)
    assert name in found
    assert not ({"relu", "tanh", "gelu", "gelu_tanh", "sigmoid", "silu", "softmax"} - {name}) & found


def test_identify_returns_nothing_for_a_residual_sum():
    rng = np.random.default_rng(1)
    y, res = rng.standard_normal((2, 8)), rng.standard_normal((2, 8))
    assert identify(y, y + res) == frozenset()


def _desc(name, kind="dense", framework="torch", **attrs):
    return LayerDesc(name, kind, "Linear" if framework == "torch" else "Dense", framework, dict(attrs))


def test_compare_reports_each_attribute_with_both_values():
    ref = {"bn": _desc("bn", "batchnorm", eps=1e-5), "fc": _desc("fc", use_bias=True)}
    tgt = {"bn": _desc("bn", "batchnorm", "tf", eps=1e-3), "fc": _desc("fc", "conv1d", "tf")}
    diffs = compare(ref, tgt, [("bn", "bn"), ("fc", "fc")])
    assert Difference("bn", "eps", "1e-05", "0.001") in diffs
    assert [d.attribute for d in diffs if d.layer == "fc"] == ["layer type"]
    assert "bn: eps is 1e-05 in the reference, 0.001 in the target" in [d.message() for d in diffs]
    same = {"bn": _desc("bn", "batchnorm", "tf", eps=1.0000001e-05)}
    assert compare({"bn": ref["bn"]}, same, [("bn", "bn")]) == []


def test_recorded_activation_is_compared_and_unknown_claims_nothing():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((2, 4)).astype(np.float32)

    def descs(fn_out):
        d = {"a": _desc("a"), "b": _desc("b")}
        events = [Event("a", "a", "dense", None, y, y), Event("b", "b", "dense", None, fn_out, fn_out)]
        analyse(d, events, fn_out)
        return d

    relu, tanh, unknown = descs(np.maximum(y, 0)), descs(np.tanh(y)), descs(y + 1.5)
    assert relu["a"].activation() == "relu" and relu["a"].order == 0
    assert [d.attribute for d in compare(tanh, relu, [("a", "a")])] == ["activation"]
    assert compare(unknown, relu, [("a", "a")]) == []


def test_trap_warnings_only_for_keras_targets_under_torch_weights():
    tgt = {"conv": LayerDesc("conv", "conv2d", "Conv2D", "tf", {"tf_padding": "same", "stride": (2, 2)}),
           "ln": LayerDesc("ln", "layernorm", "LayerNormalization", "tf", {"eps": 1e-3}),
           "ok": LayerDesc("ok", "layernorm", "LayerNormalization", "tf", {"eps": 1e-5})}
    warnings = trap_warnings(tgt, "torch")
    assert len(warnings) == 2 and warnings[0].startswith("conv (Conv2D)") and warnings[1].startswith("ln ")
    assert trap_warnings(tgt, "keras") == []


@pytest.mark.parametrize("ckpt_native", ["canonical", "keras-kernel"])
def test_flatten_fix_permutes_the_columns_into_the_target_order(ckpt_native):
    from hubload.layout import Transform

    rng = np.random.default_rng(3)
    c, h, w, out = 3, 2, 4, 5
    fmap = rng.standard_normal((c, h, w))
    weight = rng.standard_normal((out, c * h * w))  # torch: columns in (c, h, w) order
    want = weight @ fmap.reshape(-1)
    native, t0 = (weight, None) if ckpt_native == "canonical" else (weight.T.copy(), Transform(perm=(1, 0)))
    report = CompatReport(matched=[Match("fc.weight", "fc.weight", "fc.weight", (out, c * h * w), "float32",
                                         "float32", None, t0)])
    tgt = {"fc": LayerDesc("fc", "dense", "Dense", "tf", {"flatten_of": ((h, w, c), "channels_last")})}
    notes = flatten_fixes(report, tgt, lambda prefix: "channels_first")
    assert len(notes) == 1 and notes[0].startswith("fc (Dense)")
    fixed = report.matched[0].transform.apply(native)
    assert fixed.shape == (out, c * h * w)
    np.testing.assert_allclose(fixed @ np.moveaxis(fmap, 0, -1).reshape(-1), want)  # Keras flattens (h, w, c)
    assert flatten_fixes(report, tgt, lambda prefix: "channels_last") == []


def test_first_divergent_names_the_layer_whose_output_differs():
    x = np.ones((1, 4))
    ref = [Event("a", "a", "dense", None, x, x), Event("b", "b", "dense", None, x, x),
           Event("c", "c", "dense", None, x, x)]
    tgt = [Event("a", "a", "dense", None, x, x), Event("b", "b", "dense", None, x, x),
           Event("c", "c", "dense", None, x * 2, x)]
    layer, detail = first_divergent(ref, tgt, {"a": "a", "b": "b", "c": "c"})
    assert layer == "b" and "c receives it" in detail
    assert first_divergent(ref, ref, {"a": "a", "b": "b", "c": "c"})[0] == "c"


def test_verification_round_trips_through_the_report():
    v = Verification(False, 0.5, 1e-5, "dense2", "reference", "detail")
    r = CompatReport(verification=v, warnings=["dense1 (Dense): note"])
    assert not r.ok and "first divergent layer: dense2" in r.render() and "dense1 (Dense): note" in r.render()
    back = CompatReport.from_dict(r.to_dict())
    assert back.verification == v and back.warnings == r.warnings


def test_probe_inputs_are_seeded_and_bounded():
    a = make_input({"shape": [3, 5], "seed": 7})
    assert np.array_equal(a, make_input({"shape": [3, 5], "seed": 7}))
    assert not np.array_equal(a, make_input({"shape": [3, 5], "seed": 8}))
    assert a.dtype == np.float32 and a.min() >= -2 and a.max() < 2
    ids = make_input({"shape": [2, 50], "dtype": "int64", "low": 3, "high": 9})
    assert ids.dtype == np.int64 and ids.min() >= 3 and ids.max() < 9 and len(set(ids.ravel())) == 6


def test_check_digest_passes_fails_and_does_not_apply():
    out = np.random.default_rng(4).standard_normal((2, 3))
    d = digest(out)
    assert check_digest(d, out)[0] is True
    assert check_digest(d, out + 1e-2)[0] is False
    assert check_digest(d, out.reshape(3, 2))[0] is None
    assert math.isclose(d["norm"], float(np.linalg.norm(out)))


_ENTRY = {"source": "https://example.com/", "files": [{"path": "m.safetensors", "sha256": "a" * 64}]}
_PROBE = {"reference": "numpy", "input": {"shape": [1, 2]}, "output": {"shape": [1, 2], "norm": 1.0}}


def test_registry_probe_is_validated():
    entry = parse_registry({"version": 1, "models": {"m": {**_ENTRY, "probe": _PROBE}}})["m"]
    assert entry.probe["input"]["shape"] == [1, 2]
    for bad, field in (({**_PROBE, "extra": 1}, "probe.extra"),
                       ({**_PROBE, "input": {"shape": [0]}}, "probe.input.shape"),
                       ({**_PROBE, "output": {"shape": [1], "values": ["x"]}}, "probe.output.values"),
                       ({k: v for k, v in _PROBE.items() if k != "reference"}, "probe.reference"),
                       ({**_PROBE, "input": {"shape": [1], "dtype": "str"}}, "probe.input.dtype")):
        with pytest.raises(RegistryError) as info:
            parse_registry({"version": 1, "models": {"m": {**_ENTRY, "probe": bad}}})
        assert info.value.field == field
