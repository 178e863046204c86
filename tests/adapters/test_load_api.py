"""``hubload.load`` / ``hubload.check`` end to end through the public API: every source kind, every option.

Tiny MLP twins (``dense1`` relu -> ``dense2``) from the zoo, random weights, checkpoints written to tmp_path
in each format; results are compared with the model the checkpoint came from, never with numbers by hand.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")
yaml = pytest.importorskip("yaml")

from click.testing import CliRunner  # noqa: E402

import hubload  # noqa: E402
from hubload.zoo import keras_models as zoo_keras, torch_models as zoo_torch  # noqa: E402
from hubload.cli import cli  # noqa: E402
from hubload.relayout import convert  # noqa: E402
from hubload.errors import HubloadError, IncompatibleWeightsError, ModelNotFoundError  # noqa: E402
from tests.seed_models import MyModel, TorchMyModel  # noqa: E402
from tests.servers import file_sha256  # noqa: E402

IN, HID, OUT = 8, 16, 3
CFG = {"in_features": IN, "hidden": HID, "num_classes": OUT}


# ------------------------------------------------------------------------------------------------ helpers


def torch_mlp(seed: int | None = None, **cfg):
    if seed is not None:
        torch.manual_seed(seed)
    return zoo_torch.mlp(**{**CFG, **cfg}).eval()


def keras_mlp(seed: int | None = None, **cfg):
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return zoo_keras.mlp(**{**CFG, **cfg})


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((4, IN)).astype(np.float32)


def out_torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def out_keras(model, x):
    return keras.ops.convert_to_numpy(model(x))


def params(model) -> dict[str, np.ndarray]:
    """A copy of every parameter (torch state_dict or Keras variables by path)."""
    if isinstance(model, torch.nn.Module):
        return {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    return {v.path: np.array(v.numpy()) for v in model.weights}


def assert_same_params(before: dict[str, np.ndarray], model) -> None:
    after = params(model)
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def state_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def write_registry(path, models: dict) -> str:
    path.write_text(yaml.safe_dump({"version": 1, "models": models}, sort_keys=False))
    return str(path)


def local_entry(folder, file: str, **extra) -> dict:
    """A registry entry for a file in ``folder`` (a file:// source with its computed sha256)."""
    return {"source": f"file://{folder}", "files": [{"path": file, "sha256": file_sha256(folder / file)}],
            "architecture": {"torch": "hubload.zoo.torch_models:mlp", "tf": "hubload.zoo.keras_models:mlp"},
            "config": dict(CFG), **extra}


# ---------------------------------------------------------------------------------------- torch-born sources


@pytest.fixture(scope="module")
def torch_ref():
    return torch_mlp(seed=1)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory, torch_ref):
    """The torch reference's state_dict in every torch-side format."""
    d = tmp_path_factory.mktemp("torch-born")
    sd = {k: v.contiguous() for k, v in torch_ref.state_dict().items()}
    safetensors_torch.save_file(sd, d / "w.safetensors")
    torch.save(sd, d / "w.pt")
    np.savez(d / "w.npz", **{k: v.numpy() for k, v in sd.items()})
    shard_dir = d / "sharded"
    shard_dir.mkdir()
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[:2], names[2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        safetensors_torch.save_file({k: sd[k] for k in part}, shard_dir / fname)
        weight_map.update({k: fname for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"safetensors": d / "w.safetensors", "pt": d / "w.pt", "npz": d / "w.npz", "sharded-folder": shard_dir,
            "sharded-index": shard_dir / "model.safetensors.index.json"}


@pytest.mark.parametrize("kind", ["safetensors", "pt", "npz", "sharded-folder", "sharded-index"])
@pytest.mark.parametrize("target", ["torch", "keras"])
def test_load_torch_born_local_files_into_both_frameworks(torch_files, torch_ref, x, kind, target):
    model = torch_mlp(seed=2) if target == "torch" else keras_mlp(seed=2)
    run = out_torch if target == "torch" else out_keras
    assert not np.allclose(run(model, x), out_torch(torch_ref, x))  # the load below has work to do
    got = hubload.load(str(torch_files[kind]), model=model)
    assert got is model
    np.testing.assert_allclose(run(model, x), out_torch(torch_ref, x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- keras-born sources


@pytest.fixture(scope="module")
def keras_ref():
    return keras_mlp(seed=3)


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory, keras_ref):
    """The Keras reference saved as .weights.h5 and as a tf.train.Checkpoint (prefix and folder)."""
    d = tmp_path_factory.mktemp("keras-born")
    keras_ref.save_weights(str(d / "m.weights.h5"))
    prefix = tf.train.Checkpoint(model=keras_ref).save(str(d / "ckpt" / "c"))
    return {"weights.h5": d / "m.weights.h5", "tf-prefix": prefix, "tf-folder": d / "ckpt"}


@pytest.mark.parametrize("kind", ["weights.h5", "tf-prefix", "tf-folder"])
@pytest.mark.parametrize("target", ["torch", "keras"])
def test_load_keras_born_local_files_into_both_frameworks(keras_files, keras_ref, x, kind, target):
    model = torch_mlp(seed=4) if target == "torch" else keras_mlp(seed=4)
    run = out_torch if target == "torch" else out_keras
    ref = out_keras(keras_ref, x)
    assert not np.allclose(run(model, x), ref)
    hubload.load(str(keras_files[kind]), model=model)
    np.testing.assert_allclose(run(model, x), ref, rtol=0, atol=1e-6)


def test_load_accepts_pathlike_and_file_url(torch_files, torch_ref, x):
    model = hubload.load(torch_files["safetensors"], model=torch_mlp(seed=5))
    np.testing.assert_allclose(out_torch(model, x), out_torch(torch_ref, x), rtol=0, atol=0)
    model = hubload.load(torch_files["pt"].as_uri(), model=torch_mlp(seed=5))
    np.testing.assert_allclose(out_torch(model, x), out_torch(torch_ref, x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- remote sources


def test_load_hf_url_with_revision_from_local_hub(hub_server, torch_files, torch_ref, x, monkeypatch):
    commit_a, commit_b = "a" * 40, "b" * 40
    hub_server.add_file("org/tiny", commit_a, "sub/w.safetensors", torch_files["safetensors"])
    other = torch_mlp(seed=9)
    blob = safetensors_torch.save({k: v.contiguous() for k, v in other.state_dict().items()})
    hub_server.add_file("org/tiny", commit_b, "sub/w.safetensors", blob)  # main now points at b
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)

    at_a = hubload.load(f"hf://org/tiny@{commit_a}/sub/w.safetensors", model=torch_mlp(seed=5))
    np.testing.assert_array_equal(out_torch(at_a, x), out_torch(torch_ref, x))
    at_main = hubload.load("hf://org/tiny/sub/w.safetensors", model=keras_mlp(seed=5))
    np.testing.assert_allclose(out_keras(at_main, x), out_torch(other, x), rtol=0, atol=1e-6)
    assert hub_server.count("GET", f"/org/tiny/resolve/{commit_a}/sub/w.safetensors") >= 1


def test_load_https_url_verifies_sha256(file_server, torch_files, torch_ref, x):
    path = torch_files["safetensors"]
    url = file_server.add("/models/w.safetensors", path)
    model = hubload.load(url, model=torch_mlp(seed=6), sha256=file_sha256(path))
    np.testing.assert_array_equal(out_torch(model, x), out_torch(torch_ref, x))

    before = params(fresh := torch_mlp(seed=6))
    url2 = file_server.add("/models/w2.safetensors", path)
    with pytest.raises(hubload.HashMismatchError):
        hubload.load(url2, model=fresh, sha256="0" * 64)
    assert_same_params(before, fresh)


# ---------------------------------------------------------------------------------------- registry IDs


@pytest.mark.parametrize("framework,cls", [("torch", "torch"), ("pt", "torch"), ("pytorch", "torch"),
                                           ("tf", "keras"), ("tensorflow", "keras"), ("keras", "keras"),
                                           ("TF", "keras")])
def test_registry_id_builds_architecture_for_each_framework_alias(framework, cls, monkeypatch):
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")  # the embedded demo needs no network
    model = hubload.load("seed-mlp", framework=framework)
    expected = torch.nn.Module if cls == "torch" else keras.Model
    assert isinstance(model, expected)


def test_registry_id_twins_agree_and_infer_framework_from_model(monkeypatch):
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")
    t = hubload.load("seed-mlp", framework="torch")
    k = hubload.load("seed-mlp", framework="tf")
    x64 = np.random.default_rng(1).random((6, 64), dtype=np.float32)
    np.testing.assert_allclose(out_keras(k, x64), out_torch(t, x64), rtol=0, atol=1e-5)
    mine = zoo_keras.mlp(in_features=64, hidden=64, num_classes=10)
    assert hubload.load("seed-mlp", model=mine) is mine  # framework inferred from the model
    np.testing.assert_array_equal(out_keras(mine, x64), out_keras(k, x64))


def test_unknown_framework_name_is_refused():
    with pytest.raises(HubloadError, match="no hubload adapter named 'jaxx'"):
        hubload.load("seed-mlp", framework="jaxx")


def test_contradictory_framework_and_model_is_an_error():
    model = torch_mlp(seed=0)
    before = params(model)
    with pytest.raises(HubloadError, match="contradicts the model") as exc:
        hubload.load("seed-mlp", model=model, framework="keras")
    assert "torch" in str(exc.value)
    assert_same_params(before, model)
    hubload.load("seed-mlp", model=torch_mlp(in_features=64, hidden=64, num_classes=10), framework="pytorch")


@pytest.mark.parametrize("kw", [{"num_classes": 4}, {"config": {"hidden": 8}}])
def test_num_classes_or_config_with_model_is_an_error(kw):
    with pytest.raises(HubloadError, match="num_classes=/config="):
        hubload.load("seed-mlp", model=torch_mlp(), **kw)


def test_framework_without_architecture_lists_what_exists(tmp_path, torch_files):
    entry = local_entry(torch_files["safetensors"].parent, "w.safetensors")
    entry["architecture"] = {"torch": "hubload.zoo.torch_models:mlp"}
    reg = write_registry(tmp_path / "r.yaml", {"torch-only": entry})
    with pytest.raises(HubloadError, match=r"no tf architecture \(it has: torch\)"):
        hubload.load("torch-only", framework="tf", registry=reg)
    assert isinstance(hubload.load("torch-only", framework="torch", registry=reg), torch.nn.Module)


def test_weights_without_model_or_framework_is_an_error(torch_files):
    with pytest.raises(HubloadError, match="needs a model"):
        hubload.load(str(torch_files["safetensors"]))


def test_num_classes_replaces_the_declared_head(tmp_path, torch_files, torch_ref, x):
    entry = local_entry(torch_files["safetensors"].parent, "w.safetensors", head=["dense2.*"])
    reg = write_registry(tmp_path / "r.yaml", {"tiny": entry})
    model, report = hubload.load("tiny", framework="torch", registry=reg, num_classes=7, return_report=True)
    assert model.dense2.out_features == 7
    assert sorted(report.replaced) == ["dense2.bias", "dense2.weight"]
    np.testing.assert_array_equal(model.dense1.weight.detach().numpy(), torch_ref.dense1.weight.detach().numpy())


# ---------------------------------------------------------------------------------------- options


@pytest.fixture()
def extra_file(tmp_path, torch_ref):
    sd = {**torch_ref.state_dict(), "aux.weight": torch.ones(2, 2)}
    safetensors_torch.save_file(sd, tmp_path / "extra.safetensors")
    return tmp_path / "extra.safetensors"


@pytest.mark.parametrize("target", ["torch", "keras"])
def test_strict_refuses_unexpected_tensor_and_leaves_model_untouched(extra_file, torch_ref, x, target):
    model = torch_mlp(seed=7) if target == "torch" else keras_mlp(seed=7)
    before = params(model)
    with pytest.raises(IncompatibleWeightsError, match="aux.weight") as exc:
        hubload.load(str(extra_file), model=model)
    assert exc.value.report.unexpected == ["aux.weight"]
    assert_same_params(before, model)

    model, report = hubload.load(str(extra_file), model=model, strict=False, return_report=True)
    assert report.unexpected == ["aux.weight"] and len(report.matched) == 4
    run = out_torch if target == "torch" else out_keras
    np.testing.assert_allclose(run(model, x), out_torch(torch_ref, x), rtol=0, atol=1e-6)


@pytest.fixture()
def wrong_head_file(tmp_path):
    src = torch_mlp(seed=8, num_classes=5)
    safetensors_torch.save_file(src.state_dict(), tmp_path / "head5.safetensors")
    return src, tmp_path / "head5.safetensors"


@pytest.mark.parametrize("target", ["torch", "keras"])
def test_shape_mismatch_raises_even_non_strict_unless_excluded(wrong_head_file, target):
    src, path = wrong_head_file
    model = torch_mlp(seed=7) if target == "torch" else keras_mlp(seed=7)
    before = params(model)
    for strict in (True, False):
        with pytest.raises(IncompatibleWeightsError) as exc:
            hubload.load(str(path), model=model, strict=strict)
        assert "[5, 16]" in str(exc.value) and "[3, 16]" in str(exc.value)  # both shapes named
        assert_same_params(before, model)

    _, report = hubload.load(str(path), model=model, exclude=["dense2.*"], return_report=True)
    assert {i.key for i in report.ignored if i.side == "model"} == {"dense2.weight", "dense2.bias"}
    after = params(model)
    for k in before:
        if "dense2" in k:
            np.testing.assert_array_equal(after[k], before[k])  # excluded tensors left as they were
    if target == "torch":
        w = model.dense1.weight.detach().numpy()
    else:
        w = keras.ops.convert_to_numpy(model.dense1.kernel).T
    np.testing.assert_array_equal(w, src.dense1.weight.detach().numpy())


def test_rename_rules_map_foreign_names(tmp_path, torch_ref, x):
    sd = {k.replace("dense1", "fc_in").replace("dense2", "fc_out"): v for k, v in torch_ref.state_dict().items()}
    safetensors_torch.save_file(sd, tmp_path / "renamed.safetensors")
    with pytest.raises(IncompatibleWeightsError):
        hubload.load(str(tmp_path / "renamed.safetensors"), model=torch_mlp(seed=0))
    rules = [{"pattern": r"^fc_in\.", "replace": "dense1."}, {"pattern": r"^fc_out\.", "replace": "dense2."}]
    for model, run in ((torch_mlp(seed=0), out_torch), (keras_mlp(seed=0), out_keras)):
        hubload.load(str(tmp_path / "renamed.safetensors"), model=model, rename=rules)
        np.testing.assert_allclose(run(model, x), out_torch(torch_ref, x), rtol=0, atol=1e-6)


def test_key_picks_a_nested_state_dict(tmp_path, torch_ref, x):
    decoy = torch_mlp(seed=11)
    torch.save({"ema": torch_ref.state_dict(), "net": decoy.state_dict(), "epoch": 3}, tmp_path / "nested.pt")
    model = hubload.load(str(tmp_path / "nested.pt"), model=torch_mlp(seed=0), key="ema")
    np.testing.assert_array_equal(out_torch(model, x), out_torch(torch_ref, x))
    model = hubload.load(str(tmp_path / "nested.pt"), model=keras_mlp(seed=0), key="net")
    np.testing.assert_allclose(out_keras(model, x), out_torch(decoy, x), rtol=0, atol=1e-6)
    with pytest.raises(hubload.CheckpointError, match="ema"):
        hubload.load(str(tmp_path / "nested.pt"), model=torch_mlp(), key="missing")


def test_dtype_policy_model_casts_and_reports_checkpoint_keeps(tmp_path, torch_ref):
    half = {k: v.half() for k, v in torch_ref.state_dict().items()}
    safetensors_torch.save_file(half, tmp_path / "half.safetensors")
    model, report = hubload.load(str(tmp_path / "half.safetensors"), model=torch_mlp(seed=0), return_report=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sorted(c.key for c in report.dtype_casts) == sorted(half)
    assert {(c.from_dtype, c.to_dtype) for c in report.dtype_casts} == {("float16", "float32")}
    torch.testing.assert_close(model.dense1.weight, half["dense1.weight"].float(), rtol=0, atol=0)

    kept = hubload.load(str(tmp_path / "half.safetensors"), model=torch_mlp(seed=0), dtype="checkpoint")
    assert {p.dtype for p in kept.parameters()} == {torch.float16}
    as_bf16 = hubload.load(str(tmp_path / "half.safetensors"), model=torch_mlp(seed=0), dtype="bfloat16")
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}
    k = hubload.load(str(tmp_path / "half.safetensors"), model=keras_mlp(seed=0))
    assert {v.dtype for v in k.weights} == {"float32"}


def test_device_materialises_a_meta_model(torch_files, torch_ref, x):
    with torch.device("meta"):
        meta = zoo_torch.mlp(**CFG)
    assert all(p.is_meta for p in meta.parameters())
    model = hubload.load(str(torch_files["safetensors"]), model=meta, device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    np.testing.assert_array_equal(out_torch(model.eval(), x), out_torch(torch_ref, x))


def test_layout_override_reads_keras_named_safetensors(tmp_path, torch_ref, x):
    """A safetensors file with Keras names and [in, out] kernels, marked nowhere as Keras."""
    sd = torch_ref.state_dict()
    keras_named = {"dense1/kernel": sd["dense1.weight"].T.contiguous(), "dense1/bias": sd["dense1.bias"],
                   "dense2/kernel": sd["dense2.weight"].T.contiguous(), "dense2/bias": sd["dense2.bias"]}
    safetensors_torch.save_file(keras_named, tmp_path / "k.safetensors")
    for model, run in ((torch_mlp(seed=0), out_torch), (keras_mlp(seed=0), out_keras)):
        hubload.load(str(tmp_path / "k.safetensors"), model=model, layout="keras")
        np.testing.assert_allclose(run(model, x), out_torch(torch_ref, x), rtol=0, atol=1e-6)


def test_return_report_describes_the_load(torch_files):
    model, report = hubload.load(str(torch_files["pt"]), model=torch_mlp(seed=0), return_report=True)
    assert isinstance(report, hubload.CompatReport) and report.ok
    assert sorted(m.key for m in report.matched) == sorted(model.state_dict())
    assert str(torch_files["pt"]) in report.source and report.target == "MLP"


# ---------------------------------------------------------------------------------------- full-model artifacts


def test_keras_file_loads_without_model(tmp_path, x):
    inputs = keras.Input((IN,))
    outputs = keras.layers.Dense(OUT)(keras.layers.Dense(HID, activation="relu")(inputs))
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "full.keras")
    loaded = hubload.load(str(tmp_path / "full.keras"))
    assert isinstance(loaded, keras.Model) and loaded is not model
    np.testing.assert_allclose(out_keras(loaded, x), out_keras(model, x), rtol=0, atol=0)
    with pytest.raises(HubloadError, match="whole saved model"):
        hubload.load(str(tmp_path / "full.keras"), model=keras_mlp())


def test_savedmodel_folder_loads_without_model(tmp_path, x):
    class Affine(tf.Module):
        def __init__(self):
            self.w = tf.Variable(np.random.default_rng(4).standard_normal((IN, OUT)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, IN], tf.float32)])
        def __call__(self, v):
            return tf.matmul(v, self.w)

    mod = Affine()
    tf.saved_model.save(mod, str(tmp_path / "sm"))
    loaded = hubload.load(str(tmp_path / "sm"))
    np.testing.assert_allclose(loaded(tf.constant(x)).numpy(), mod(tf.constant(x)).numpy(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- check()


def test_check_reports_compatible_and_incompatible_without_touching_the_model(torch_files, wrong_head_file):
    model = torch_mlp(seed=0)
    before = params(model)
    ok = hubload.check(str(torch_files["safetensors"]), model=model)
    assert ok.ok and len(ok.matched) == 4
    bad = hubload.check(str(wrong_head_file[1]), model=model)
    assert not bad.ok
    assert {(m.key, m.checkpoint_shape, m.model_shape) for m in bad.shape_mismatches} == {
        ("dense2.weight", (5, 16), (3, 16)), ("dense2.bias", (5,), (3,))}
    table = bad.render()
    assert "INCOMPATIBLE" in table and "dense2.weight" in table and "[5, 16]" in table
    data = json.loads(bad.to_json())
    assert data["ok"] is False and data["counts"]["shape_mismatches"] == 2
    assert hubload.CompatReport.from_dict(data).to_dict() == data
    assert_same_params(before, model)


def test_check_registry_id_builds_the_architecture(monkeypatch):
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")
    for fw in ("torch", "tf"):
        report = hubload.check("seed-mlp", framework=fw)
        assert report.ok and len(report.matched) == 4
    with pytest.raises(HubloadError, match="needs a model"):
        hubload.check("seed-mlp")


@pytest.fixture()
def cli_registry(tmp_path, torch_files, wrong_head_file):
    good = local_entry(torch_files["safetensors"].parent, "w.safetensors")
    bad = local_entry(wrong_head_file[1].parent, "head5.safetensors")
    return write_registry(tmp_path / "cli.yaml", {"tiny-good": good, "tiny-bad": bad})


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_cli_check_exit_codes(cli_registry, framework):
    runner = CliRunner()
    res = runner.invoke(cli, ["check", "tiny-good", "--framework", framework, "--registry", cli_registry])
    assert res.exit_code == 0, res.output
    assert "OK" in res.stdout and "4 matched" in res.stdout

    res = runner.invoke(cli, ["check", "tiny-bad", "--framework", framework, "--registry", cli_registry, "--json"])
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    assert data["ok"] is False and {m["key"] for m in data["shape_mismatches"]} == {"dense2.weight", "dense2.bias"}

    res = runner.invoke(cli, ["check", "tiny-bad", "--framework", framework, "--registry", cli_registry])
    assert res.exit_code == 1 and "INCOMPATIBLE" in res.stdout and "[5, 16]" in res.stdout

    res = runner.invoke(cli, ["check", "tiny-goood", "--framework", framework, "--registry", cli_registry])
    assert res.exit_code == 2
    assert "tiny-good" in res.stderr  # the suggestion


# ---------------------------------------------------------------------------------------- issue 3, "Done when"


def test_seed_example_both_ways(tmp_path, x):
    keras.utils.set_random_seed(0)
    model = MyModel()
    model(x)
    optimizer = keras.optimizers.Adam(learning_rate=0.01)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x) ** 2)
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "tf" / "ckpt"))

    torch_model, report = hubload.load(prefix, model=TorchMyModel(), return_report=True)
    assert report.ok and len(report.matched) == 4  # optimizer slots and save_counter are not model weights
    ref = out_keras(model, x)
    np.testing.assert_allclose(out_torch(torch_model, x), ref, rtol=0, atol=1e-6)

    torch.save(torch_model.state_dict(), tmp_path / "m.pt")
    safetensors_torch.save_file(torch_model.state_dict(), tmp_path / "m.safetensors")
    for name in ("m.pt", "m.safetensors"):
        fresh = MyModel()
        fresh(x)
        hubload.load(str(tmp_path / name), model=fresh)
        np.testing.assert_allclose(out_keras(fresh, x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["torch", "keras"])
def test_ddp_and_compiled_checkpoints_load(tmp_path, torch_ref, x, target):
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        sd = {prefix + k: v for k, v in torch_ref.state_dict().items()}
        torch.save(sd, tmp_path / "ddp.pt")
        model = torch_mlp(seed=0) if target == "torch" else keras_mlp(seed=0)
        model, report = hubload.load(str(tmp_path / "ddp.pt"), model=model, return_report=True)
        assert report.prefix_changes, prefix
        run = out_torch if target == "torch" else out_keras
        np.testing.assert_allclose(run(model, x), out_torch(torch_ref, x), rtol=0, atol=1e-6)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"dense1.weight": torch.zeros(HID, IN), "payload": _Payload(marker)}, tmp_path / "evil.pt")
    model = torch_mlp(seed=0)
    before = params(model)
    for call in (lambda: hubload.load(str(tmp_path / "evil.pt"), model=model),
                 lambda: hubload.check(str(tmp_path / "evil.pt"), model=model),
                 lambda: hubload.inspect(str(tmp_path / "evil.pt"))):
        with pytest.raises(hubload.UnsafeCheckpointError, match="system"):
            call()
    assert not marker.exists()
    assert_same_params(before, model)


def test_keras_layout_file_over_https_needs_no_layout_argument(file_server, tmp_path, torch_ref, x):
    """A `hubload convert --layout keras` file says so in its metadata; the remote pre-check and the load read it."""
    safetensors_torch.save_file(torch_ref.state_dict(), tmp_path / "t.safetensors")
    convert(str(tmp_path / "t.safetensors"), layout="keras", out=tmp_path / "k.safetensors")
    url = file_server.add("/k.safetensors", tmp_path / "k.safetensors")
    sha = file_sha256(tmp_path / "k.safetensors")
    report = hubload.check(url, model=keras_mlp(seed=0), sha256=sha)
    assert report.ok and len(report.matched) == 4
    assert all(r.range is not None for r in file_server.requests if r.method == "GET")  # header only
    for model, run in ((keras_mlp(seed=0), out_keras), (torch_mlp(seed=0), out_torch)):
        hubload.load(url, model=model, sha256=sha)
        np.testing.assert_allclose(run(model, x), out_torch(torch_ref, x), rtol=0, atol=1e-6)


def test_registry_savedmodel_archive_loads_as_a_whole_model(tmp_path):
    """A SavedModel folder shipped as .tar.gz: verified, extracted safely into the cache, loaded with no model."""
    tf = pytest.importorskip("tensorflow")
    import hashlib
    import tarfile

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def __call__(self, x):
            return 2.0 * x

    tf.saved_model.save(Doubler(), str(tmp_path / "sm"))
    src = tmp_path / "weights"
    src.mkdir()
    with tarfile.open(src / "doubler.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "sm", arcname="sm")
    digest = hashlib.sha256((src / "doubler.tar.gz").read_bytes()).hexdigest()
    reg = {"version": 1, "models": {"doubler": {"source": f"file://{src}", "files": [
        {"path": "doubler.tar.gz", "sha256": digest}]}}}
    loaded = hubload.load("doubler", registry=reg)
    assert list(loaded(tf.constant([1.5, -2.0])).numpy()) == [3.0, -4.0]
