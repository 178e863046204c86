"""Family models inside the models people fine-tune: a keras-hub backbone inside a task model or a functional
model, a transformers ViTModel inside ViTForImageClassification or a user's module. The Hub's base-model file
fills the backbone part (under the Hub's names), the model's own head keeps its generic names and is reported
as missing, and the loaded backbone computes what a standalone one loaded from the same file computes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorflow")
keras_hub = pytest.importorskip("keras_hub")
transformers = pytest.importorskip("transformers")
import keras  # noqa: E402

import hubload  # noqa: E402
from hubload.adapters import get_adapter, hf_families, resolve_architecture  # noqa: E402
from hubload.errors import IncompatibleWeightsError  # noqa: E402
from hubload.families import family_for_config, family_model_spec, family_renames  # noqa: E402
from tests.adapters.test_families import _config  # noqa: E402


def _hub_file(name: str, tmp_path, seed: int = 0):
    """The family's transformers model written by ``save_pretrained`` (the Hub's names), and the config."""
    torch.manual_seed(seed)
    cfg = _config(name)
    src = hf_families.build(resolve_architecture(family_for_config(cfg).torch), cfg)
    src.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors", cfg, src


def _bert(cfg):
    return hf_families.build(keras_hub.models.BertBackbone, cfg)


def _task(cfg):
    return keras_hub.models.BertTextClassifier(backbone=_bert(cfg), num_classes=3, preprocessor=None)


def _saved_task(cfg, path, out):
    """A task model whose backbone holds the Hub file, saved by its own save_weights to ``out``."""
    task = _task(cfg)
    hubload.load(path, model=task, exclude=["logits.*"])
    task.save_weights(str(out))
    return task


def _bert_inputs():
    ids = np.random.default_rng(1).integers(1, 50, size=(2, 6)).astype("int32")
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": np.ones_like(ids, dtype=bool)}


def _same_weights(a, b) -> None:
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(np.asarray(wa.numpy()), np.asarray(wb.numpy()), err_msg=str(wa.path))


def test_keras_hub_task_model_takes_the_hub_backbone_file(tmp_path) -> None:
    path, cfg, _ = _hub_file("bert", tmp_path)
    alone = _bert(cfg)
    hubload.load(path, model=alone)
    clf = _task(cfg)
    head = [np.asarray(w.numpy()).copy() for w in clf.get_layer("logits").weights]
    with pytest.raises(IncompatibleWeightsError, match="logits"):  # strict: the head is not in the file
        hubload.load(path, model=clf)
    _, report = hubload.load(path, model=clf, exclude=["logits.*"], return_report=True)
    assert report.ok and not report.unexpected and len(report.matched) == len(alone.weights)
    _same_weights(clf.backbone, alone)
    for before, w in zip(head, clf.get_layer("logits").weights):  # excluded: left as it was
        np.testing.assert_array_equal(before, np.asarray(w.numpy()))
    inputs = _bert_inputs()
    np.testing.assert_array_equal(np.asarray(clf.backbone(inputs)["sequence_output"]),
                                  np.asarray(alone(inputs)["sequence_output"]))


def test_functional_model_around_a_backbone_loads_it_and_reports_the_head(tmp_path) -> None:
    path, cfg, _ = _hub_file("bert", tmp_path, seed=1)
    bb = _bert(cfg)
    inp = {k: keras.Input((None,), dtype="int32", name=k) for k in ("token_ids", "segment_ids", "padding_mask")}
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(bb(inp)["pooled_output"]))
    _, report = hubload.load(path, model=model, strict=False, return_report=True)
    assert sorted(report.missing) == ["head.bias", "head.weight"] and not report.unexpected
    alone = _bert(cfg)
    hubload.load(path, model=alone)
    _same_weights(bb, alone)


def test_two_backbones_are_told_apart_by_their_prefixes(tmp_path) -> None:
    path, cfg, _ = _hub_file("bert", tmp_path, seed=2)
    a, b = _bert(cfg), _bert(cfg)
    inp = {k: keras.Input((None,), dtype="int32", name=k) for k in ("token_ids", "segment_ids", "padding_mask")}
    joined = keras.layers.Concatenate()([a(inp)["pooled_output"], b(inp)["pooled_output"]])
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(joined))
    spec = family_model_spec(model, "torch")
    hub_names = set(hf_families.keras_spec(a, family_for_config(cfg)))
    prefixes = {n.split(".", 1)[0] for n in spec if n.split(".", 1)[1] in hub_names}
    assert len(prefixes) == 2 and len(spec) == len(model.weights)  # every variable, once
    # The base-model file fits neither tower by its bare names: refused, nothing copied.
    before = [np.asarray(w.numpy()).copy() for w in model.weights]
    with pytest.raises(IncompatibleWeightsError):
        hubload.load(path, model=model)
    for x, w in zip(before, model.weights):
        np.testing.assert_array_equal(x, np.asarray(w.numpy()))


def test_convert_of_a_task_model_writes_hub_names_for_its_backbone(tmp_path) -> None:
    path, cfg, src = _hub_file("bert", tmp_path, seed=3)
    _saved_task(cfg, path, tmp_path / "clf.weights.h5")
    hubload.convert(tmp_path / "clf.weights.h5", layout="torch", out=tmp_path / "clf.safetensors", model=_task(cfg))
    fresh = hf_families.build(resolve_architecture(family_for_config(cfg).torch), cfg)
    _, report = hubload.load(tmp_path / "clf.safetensors", model=fresh, strict=False, return_report=True)
    assert not report.missing and sorted(report.unexpected) == ["logits.bias", "logits.weight"]
    for (k, x), y in zip(src.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k


def test_a_compiled_task_models_own_file_round_trips_with_its_optimizer_state_ignored(tmp_path) -> None:
    """keras-hub tasks compile themselves, so save_weights writes optimizer/vars/N beside the layers."""
    path, cfg, _ = _hub_file("bert", tmp_path, seed=5)
    a = _saved_task(cfg, path, tmp_path / "a.weights.h5")
    b = _task(cfg)
    _, report = hubload.load(tmp_path / "a.weights.h5", model=b, return_report=True)
    assert report.ok and len(report.matched) == len(b.weights)
    assert {i.key for i in report.ignored} == {"optimizer.0", "optimizer.1"}
    assert all("optimizer state" in i.reason for i in report.ignored)
    _same_weights(a, b)


def _vit_config(cfg, **extra):
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
            "patch_size")
    return transformers.ViTConfig(**{k: cfg[k] for k in keys}, **extra)


def test_vit_classifier_and_a_users_wrapper_take_the_hub_vit_file(tmp_path) -> None:
    path, cfg, src = _hub_file("vit", tmp_path, seed=4)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = hf_families.build(transformers.ViTModel, cfg)
            self.head = torch.nn.Linear(16, 2)

    clf = transformers.ViTForImageClassification(_vit_config(cfg, num_labels=3))
    assert family_renames(clf) == family_for_config(cfg).renames
    _, report = hubload.load(path, model=clf, strict=False, return_report=True)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert sorted(report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]  # the classifier has none
    wrap = Wrap()
    _, report = hubload.load(path, model=wrap, exclude=["head.*"], return_report=True)
    assert report.ok and not report.unexpected
    pixels = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype("float32"))
    with torch.no_grad():
        want = src(pixel_values=pixels).last_hidden_state
        assert torch.equal(wrap.enc(pixel_values=pixels).last_hidden_state, want)
        assert torch.equal(clf.vit(pixel_values=pixels).last_hidden_state, want)


def test_two_families_in_one_model_get_no_renames() -> None:
    """A text tower beside an image tower: one family's name rules would rewrite the other's tensors."""
    class Towers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = hf_families.build(transformers.BertModel, _config("bert"))
            self.image = hf_families.build(transformers.ViTModel, _config("vit"))

    assert family_renames(Towers()) == ()
    generic = get_adapter("torch").spec(Towers())
    assert any(n.startswith("image.layers.0.") for n in generic)
