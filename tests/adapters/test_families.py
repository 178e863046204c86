"""Model families on both frameworks: transformers (torch) and keras-hub (Keras) built from one config.json,
loaded through hubload from one safetensors file, agree numerically; every Keras variable is reached."""

from __future__ import annotations

import fnmatch
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

import hubload  # noqa: E402
from hubload.adapters import hf_families, resolve_architecture  # noqa: E402
from hubload.errors import HubloadError  # noqa: E402
from hubload.families import FAMILIES, family_for_config  # noqa: E402

TINY = {
    "bert": dict(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=20),
    "distilbert": dict(model_type="distilbert", vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                       max_position_embeddings=20),
    "gpt2": dict(model_type="gpt2", vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=20,
                 bos_token_id=0, eos_token_id=0),
    "llama": dict(model_type="llama", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False, rope_theta=10000.0),
    "mistral": dict(model_type="mistral", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2": dict(model_type="qwen2", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False, rope_theta=10000.0),
    "vit": dict(model_type="vit", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                image_size=16, patch_size=4),
}


def _config(name: str) -> dict:
    """A tiny config.json as transformers writes it (every key present)."""
    fam = next(f for f in FAMILIES if f.name == name)
    cfg = resolve_architecture(fam.config_class)(**TINY[name]).to_dict()
    return json.loads(json.dumps(cfg, default=str))


def _torch_out(fam, model, ids, mask, pixels):
    base = model.model if fam.torch_output == "model" else model
    with torch.no_grad():
        if fam.name == "vit":
            return base(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
        return base(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


def _keras_out(fam, backbone, ids, mask, pixels):
    if fam.name == "vit":
        return np.asarray(backbone(np.transpose(pixels, (0, 2, 3, 1))))
    inputs = {"token_ids": ids, "padding_mask": mask}
    if fam.name == "bert":
        inputs["segment_ids"] = np.zeros_like(ids)
    out = backbone(inputs)
    return np.asarray(out["sequence_output"] if isinstance(out, dict) else out)


@pytest.mark.parametrize("name", sorted(TINY))
def test_family_agrees_across_frameworks(name, tmp_path) -> None:
    torch.manual_seed(0)
    cfg = _config(name)
    fam = family_for_config(cfg)
    assert fam is not None and fam.name == name
    tm = hf_families.build(resolve_architecture(fam.torch), cfg)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(path))

    kb = hf_families.build(resolve_architecture(fam.keras), cfg)
    spec = hf_families.keras_spec(kb, fam)
    covered = set()
    for t in spec.values():
        ports = getattr(t.handle, "ports", None)
        covered.update(id(v) for v, _ in ports) if ports else covered.add(id(t.handle))
    assert covered == {id(w) for w in kb.weights}  # every backbone variable is loaded from a Hub tensor
    before = [np.array(w.numpy()) for w in kb.weights]
    _, report = hubload.load(path, model=kb, return_report=True)
    assert report.ok and not report.missing
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, kb.weights))

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(2, 7)).astype("int32")
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    pixels = rng.standard_normal((2, 3, 16, 16)).astype("float32")
    want = _torch_out(fam, tm, ids.astype("int64"), mask.astype("int64"), pixels)
    got = _keras_out(fam, kb, ids, mask.astype(bool), pixels)
    if fam.name != "vit":  # padded positions are undefined on both sides
        want, got = want[mask.astype(bool)], got[mask.astype(bool)]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_gpt2_fused_qkv_is_one_hub_tensor_split_into_three_kernels(tmp_path) -> None:
    torch.manual_seed(1)
    cfg = _config("gpt2")
    fam = family_for_config(cfg)
    tm = hf_families.build(resolve_architecture(fam.torch), cfg)
    kb = hf_families.build(resolve_architecture(fam.keras), cfg)
    spec = hf_families.keras_spec(kb, fam)
    fused = spec["h.0.attn.c_attn.weight"]
    assert isinstance(fused.handle, hf_families.PortGroup) and fused.shape == (16, 48)  # Conv1D [in, 3*out]
    assert len(fused.handle.ports) == 3
    want = tm.state_dict()["h.0.attn.c_attn.weight"].numpy()
    fused.handle.assign(want)
    np.testing.assert_array_equal(fused.handle.numpy(), want)  # the three kernels hold exactly its parts
    q = np.asarray(fused.handle.ports[0][0].numpy()).reshape(16, 16)
    np.testing.assert_array_equal(q, want[:, :16])
    with pytest.raises(ValueError, match="expected shape"):
        fused.handle.assign(want[:, :16])


def test_a_variable_no_hub_name_reaches_is_an_error(monkeypatch) -> None:
    cfg = _config("bert")
    fam = family_for_config(cfg)
    kb = hf_families.build(resolve_architecture(fam.keras), cfg)
    real = hf_families._Recorder.port_weight

    def skip_pooler(self, keras_variable, hf_weight_key, hook_fn=None):
        if not hf_weight_key.startswith("pooler."):
            real(self, keras_variable, hf_weight_key, hook_fn)

    monkeypatch.setattr(hf_families._Recorder, "port_weight", skip_pooler)
    with pytest.raises(HubloadError, match="pooled_dense"):
        hf_families.keras_spec(kb, fam)


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_file_from_save_pretrained_loads_on_both_sides(name, tmp_path) -> None:
    """transformers writes the Hub's names (for ViT, the names of transformers 4, which ViTModel no longer
    uses): hubload renames them for the family, so the file fills a fresh torch model and the Keras backbone."""
    torch.manual_seed(2)
    cfg = _config(name)
    fam = family_for_config(cfg)
    src = hf_families.build(resolve_architecture(fam.torch), cfg)
    src.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    fresh = hf_families.build(resolve_architecture(fam.torch), cfg)
    _, treport = hubload.load(path, model=fresh, return_report=True)
    assert treport.ok and not treport.missing and not treport.unexpected
    for (k, a), b in zip(src.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    kb = hf_families.build(resolve_architecture(fam.keras), cfg)
    _, kreport = hubload.load(path, model=kb, return_report=True)
    assert kreport.ok and not kreport.missing and not kreport.unexpected
    ignored = {i.key for i in kreport.ignored}
    assert all(any(fnmatch.fnmatchcase(k, g) for g in fam.keras_absent) for k in ignored)  # only by design

    rng = np.random.default_rng(1)
    ids = rng.integers(1, 50, size=(2, 6)).astype("int32")
    mask = np.ones_like(ids)
    pixels = rng.standard_normal((2, 3, 16, 16)).astype("float32")
    want = _torch_out(fam, src, ids.astype("int64"), mask.astype("int64"), pixels)
    np.testing.assert_allclose(_keras_out(fam, kb, ids, mask.astype(bool), pixels), want, atol=1e-4, rtol=1e-4)


def test_vit_keras_side_takes_config_layer_norm_eps() -> None:
    cfg = {**_config("vit"), "layer_norm_eps": 1e-5}
    kb = hf_families.build(resolve_architecture(family_for_config(cfg).keras), cfg)
    eps = {layer.epsilon for layer in kb._flatten_layers(include_self=False, recursive=True)
           if type(layer).__name__ == "LayerNormalization"}
    assert eps == {1e-5}  # keras-hub's converter would leave its own 1e-6


def test_bare_hub_source_builds_vit_on_both_sides(tmp_path, monkeypatch) -> None:
    """A ViT repo as the Hub serves it (save_pretrained's file + config.json), loaded by ``hf://`` alone."""
    from tests.servers import HubServer

    torch.manual_seed(3)
    cfg = _config("vit")
    src = hf_families.build(resolve_architecture(family_for_config(cfg).torch), cfg)
    src.save_pretrained(tmp_path)
    commit = "c" * 40
    with HubServer() as hub:
        hub.add_file("org/tiny-vit", commit, "model.safetensors", tmp_path / "model.safetensors", lfs=True)
        hub.add_file("org/tiny-vit", commit, "config.json", tmp_path / "config.json", lfs=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HUBLOAD_CACHE", str(tmp_path / "cache"))
        tm = hubload.load(f"hf://org/tiny-vit@{commit}", framework="torch")
        km = hubload.load(f"hf://org/tiny-vit@{commit}", framework="tf")
    assert type(tm).__name__ == "ViTModel" and type(km).__name__ == "ViTBackbone"
    pixels = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype("float32")
    fam = family_for_config(cfg)
    want = _torch_out(fam, src, None, None, pixels)
    np.testing.assert_allclose(_torch_out(fam, tm, None, None, pixels), want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_keras_out(fam, km, None, None, pixels), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_keras_backbone_weights_convert_to_hub_names_that_transformers_loads(name, tmp_path) -> None:
    """keras-hub as the source: the backbone's own .weights.h5, converted with the backbone at hand, comes out
    under the Hub's names, and transformers' class computes what the backbone computes."""
    cfg = _config(name)
    fam = family_for_config(cfg)
    kb = hf_families.build(resolve_architecture(fam.keras), cfg)
    rng = np.random.default_rng(4)
    for v in kb.weights:
        v.assign((rng.standard_normal(tuple(v.shape)) * 0.2).astype(v.dtype))
    kb.save_weights(str(tmp_path / "b.weights.h5"))
    fresh = hf_families.build(resolve_architecture(fam.keras), cfg)
    hubload.convert(str(tmp_path / "b.weights.h5"), layout="torch", out=tmp_path / "model.safetensors", model=fresh)
    tm = hf_families.build(resolve_architecture(fam.torch), cfg)
    _, report = hubload.load(tmp_path / "model.safetensors", model=tm, return_report=True, strict=False)
    absent = [k for k in report.missing if not any(fnmatch.fnmatchcase(k, g) for g in fam.keras_absent)]
    assert report.matched and not report.unexpected and not absent, report
    ids = rng.integers(1, 50, size=(2, 6)).astype("int32")
    mask = np.ones_like(ids)
    pixels = rng.standard_normal((2, 3, 16, 16)).astype("float32")
    np.testing.assert_allclose(_keras_out(fam, kb, ids, mask.astype(bool), pixels),
                               _torch_out(fam, tm, ids.astype("int64"), mask.astype("int64"), pixels),
                               atol=1e-4, rtol=1e-4)
