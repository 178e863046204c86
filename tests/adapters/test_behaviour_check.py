"""No silent wrong load: pairs whose names and shapes line up but which compute differently.

Every pair ends either refused (IncompatibleWeightsError naming the layer, every target tensor bit-identical to
before) or loaded with outputs agreeing within 1e-5; equivalent pairs load with no false alarm. Sources are live
models (the reference), in both directions across frameworks and within one framework.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

import hubload  # noqa: E402
from hubload.errors import IncompatibleWeightsError, UsageError  # noqa: E402

from tests.behaviour_twins import (  # noqa: E402
    TConv,
    TMLP,
    TNorm,
    TResidual,
    kconv,
    kmlp,
    knorm,
    kres,
    randomise_keras,
    randomise_torch,
)


def _values(model):
    """Every tensor of a model, as numpy copies keyed by canonical name."""
    from hubload.adapters import get_adapter

    adapter = get_adapter(model)
    return {k: np.array(adapter.read_tensor(t)) for k, t in adapter.spec(model).items()}


def _run(model, x_nchw):
    """Model output for canonical (channels-first) input."""
    from hubload.adapters import get_adapter

    adapter = get_adapter(model)
    out, _ = adapter.run(model, adapter.to_native_inputs(model, [x_nchw]))
    return out[0]


def _source(make):
    model = make()
    return randomise_torch(model, 1) if isinstance(model, torch.nn.Module) else randomise_keras(model, 1)


# (name, reference factory, target factory, layer the refusal must name or None if it must load)
DIFFERENT = [
    ("relu-vs-tanh t->k", lambda: TMLP("tanh"), lambda: kmlp(act="relu"), "dense1"),
    ("relu-vs-tanh k->t", lambda: kmlp(act="tanh"), lambda: TMLP("relu"), "dense1"),
    ("relu-vs-tanh t->t", lambda: TMLP("tanh"), lambda: TMLP("relu"), "dense1"),
    ("same-stride2 t->k", lambda: TConv(stride=2, padding=1), lambda: kconv(stride=2, padding="same", eps=1e-5),
     "conv"),
    ("same-stride2 k->t", lambda: kconv(stride=2, padding="same", eps=1e-5), lambda: TConv(stride=2, padding=1),
     "conv"),
    ("bn-eps t->k", lambda: TConv(), lambda: kconv(eps=1e-3), "bn"),
    ("bn-eps k->t", lambda: kconv(eps=1e-3), lambda: TConv(eps=1e-5), "bn"),
    ("bn-eps k->k", lambda: kconv(eps=1e-3), lambda: kconv(eps=1e-5), "bn"),
    ("ln-eps t->k", lambda: TNorm(eps=1e-5), lambda: knorm(eps=1e-3), "norm"),
    ("ln-eps k->t", lambda: knorm(eps=1e-3), lambda: TNorm(eps=1e-5), "norm"),
    ("gelu-tanh-vs-exact t->k", lambda: TMLP("gelu_tanh"), lambda: kmlp(act="gelu"), "dense1"),
    ("gelu-tanh-vs-exact k->t", lambda: kmlp(act="gelu_tanh"), lambda: TMLP("gelu"), "dense1"),
    ("gelu-tanh-vs-exact t->t", lambda: TMLP("gelu_tanh"), lambda: TMLP("gelu"), "dense1"),
    ("dilation t->k", lambda: TConv(dilation=2, size=8), lambda: kconv(dilation=1, eps=1e-5), "conv"),
    ("dilation t->t", lambda: TConv(dilation=2), lambda: TConv(dilation=1, size=6), "conv"),
    ("max-vs-avg t->k", lambda: TConv(pool="avg"), lambda: kconv(pool="max", eps=1e-5), "bn"),
    ("max-vs-avg k->t", lambda: kconv(pool="avg", eps=1e-5), lambda: TConv(pool="max"), "bn"),
    ("max-vs-avg t->t", lambda: TConv(pool="avg"), lambda: TConv(pool="max"), "bn"),
    ("missing-residual t->k", lambda: TResidual(True), lambda: kres(residual=False), "dense2"),
    ("missing-residual k->t", lambda: kres(residual=True), lambda: TResidual(False), "dense2"),
    ("missing-residual t->t", lambda: TResidual(True), lambda: TResidual(False), "dense2"),
    ("softmax-head t->k", lambda: TMLP(), lambda: kmlp(softmax=True), "dense2"),
    ("softmax-head k->t", lambda: kmlp(softmax=True), lambda: TMLP(), "dense2"),
    ("softmax-head t->t", lambda: TMLP(softmax=True), lambda: TMLP(), "dense2"),
]

EQUIVALENT = [
    ("mlp t->k", lambda: TMLP(), lambda: kmlp()),
    ("mlp k->t", lambda: kmlp(), lambda: TMLP()),
    ("gelu exact t->k", lambda: TMLP("gelu"), lambda: kmlp(act="gelu")),
    ("torch padding=1 vs ZeroPadding+valid t->k", lambda: TConv(stride=2, padding=1),
     lambda: kconv(stride=2, padding=1, eps=1e-5)),
    ("valid padding, eps equal, flatten t->k", lambda: TConv(), lambda: kconv(eps=1e-5)),
    ("valid padding, eps equal, flatten k->t", lambda: kconv(eps=1e-5), lambda: TConv()),
    ("layernorm eps equal t->k", lambda: TNorm(eps=1e-5), lambda: knorm(eps=1e-5)),
    ("residual kept t->k", lambda: TResidual(True), lambda: kres(residual=True)),
    ("softmax on both t->k", lambda: TMLP(softmax=True), lambda: kmlp(softmax=True)),
]


@pytest.mark.parametrize("name,make_ref,make_target,layer", DIFFERENT, ids=[c[0] for c in DIFFERENT])
def test_pair_that_computes_differently_is_refused_naming_the_layer(name, make_ref, make_target, layer):
    ref, target = _source(make_ref), make_target()
    before = _values(target)
    with pytest.raises(IncompatibleWeightsError) as info:
        hubload.load(ref, model=target)
    assert layer in str(info.value)
    after = _values(target)
    assert before.keys() == after.keys()
    for k in before:  # bit-identical: refused before the copy, or rolled back after it
        assert np.array_equal(before[k], after[k]), k


@pytest.mark.parametrize("name,make_ref,make_target", EQUIVALENT, ids=[c[0] for c in EQUIVALENT])
def test_equivalent_pair_loads_with_outputs_within_1e5(name, make_ref, make_target):
    ref, target = _source(make_ref), make_target()
    model, report = hubload.load(ref, model=target, return_report=True)
    assert report.ok and not report.behaviour
    assert report.verification is not None and report.verification.passed
    x = np.random.default_rng(5).uniform(-2, 2, size=(3, 3, 8, 8) if "padding" in name or "flatten" in name
                                         else (3, 6)).astype("float32")
    np.testing.assert_allclose(_run(model, x), _run(ref, x), rtol=0, atol=1e-5)


def test_missing_residual_names_the_first_divergent_layer_in_the_verification():
    ref, target = _source(lambda: TResidual(True)), kres(residual=False)
    with pytest.raises(IncompatibleWeightsError) as info:
        hubload.load(ref, model=target)
    v = info.value.report.verification
    assert not v.passed and v.first_divergent == "dense2" and v.max_abs_diff > v.tolerance
    assert not info.value.report.behaviour  # only the numbers show it


def test_check_with_a_live_source_reports_and_leaves_the_model_as_it_was():
    ref, target = _source(lambda: TMLP("tanh")), kmlp(act="relu")
    before = _values(target)
    report = hubload.check(ref, model=target)
    assert not report.ok
    assert [(d.layer, d.attribute, d.reference, d.target) for d in report.behaviour] == \
        [("dense1", "activation", "tanh", "relu")]
    assert "behaviour differences" in report.render() and "dense1" in report.to_json()
    back = hubload.CompatReport.from_dict(report.to_dict())
    assert back.behaviour == report.behaviour
    assert all(np.array_equal(before[k], v) for k, v in _values(target).items())


def test_reference_for_a_checkpoint_file(tmp_path):
    from safetensors.torch import save_file

    ref = _source(lambda: TMLP("tanh"))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    with pytest.raises(IncompatibleWeightsError, match="dense1"):
        hubload.load(str(path), model=kmlp(act="relu"), reference=ref)
    model, report = hubload.load(str(path), model=kmlp(act="tanh"), reference=ref, return_report=True)
    assert report.verification.passed and report.verification.against == "reference"


def test_verify_false_skips_the_numbers_but_not_the_comparison():
    ref = _source(lambda: TResidual(True))
    model, report = hubload.load(ref, model=kres(residual=False), verify=False, return_report=True)
    assert report.verification is None  # asked for: loaded without the numeric check
    with pytest.raises(IncompatibleWeightsError, match="dense1"):
        hubload.load(_source(lambda: TMLP("tanh")), model=kmlp(), verify=False)


def test_example_inputs_in_the_target_convention():
    ref, target = _source(lambda: TConv()), kconv(eps=1e-5)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")  # NHWC: Keras' convention
    _, report = hubload.load(ref, model=target, example_inputs=x, return_report=True)
    assert report.verification.passed


def test_bad_usage_raises_usage_error():
    with pytest.raises(UsageError, match="verify"):
        hubload.load(TMLP(), model=kmlp(), verify="yes")
    with pytest.raises(UsageError, match="live"):
        hubload.load(object(), model=kmlp())
    with pytest.raises(UsageError, match="model="):
        hubload.load(TMLP())
    ref = TMLP()
    with pytest.raises(UsageError, match="reference"):
        hubload.load(ref, model=kmlp(), reference=ref)


def test_resnet18_twins_load_live_without_false_alarm():
    """A realistic pair: torch padding=1 convs vs Keras ZeroPadding inside a Conv2D subclass, max pool, BN."""
    from hubload.zoo import keras_models as zoo_keras, torch_models as zoo_torch

    src = zoo_torch.resnet18(num_classes=10).eval()
    _, report = hubload.load(src, model=zoo_keras.resnet18(num_classes=10), return_report=True)
    assert not report.behaviour and not report.warnings
    assert report.verification.passed


@pytest.mark.parametrize("budget,copied_first", [(None, True), (0, False)], ids=["rollback", "before-copy"])
def test_keras_verification_failure_leaves_the_model_bit_identical_on_both_paths(budget, copied_first, monkeypatch):
    """Small Keras models are copied, run, and rolled back (the rollback re-points the variables at their old
    buffers); over the in-memory budget they are run on the checkpoint's values before any copy."""
    from hubload.adapters import keras_apply
    from hubload.adapters import tf as tf_adapter

    if budget is not None:
        monkeypatch.setattr(keras_apply, "ROLLBACK_IN_MEMORY", budget)
    snapshots = []
    real = tf_adapter.snapshot
    monkeypatch.setattr(tf_adapter, "snapshot", lambda *a: snapshots.append(1) or real(*a))
    ref, target = _source(lambda: TResidual(True)), kres(residual=False)
    before = _values(target)
    with pytest.raises(IncompatibleWeightsError) as info:
        hubload.load(ref, model=target)
    assert info.value.report.verification.first_divergent == "dense2"
    assert bool(snapshots) is copied_first
    after = _values(target)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    model, report = hubload.load(_source(lambda: TResidual(True)), model=kres(residual=True), return_report=True)
    assert report.verification.passed
