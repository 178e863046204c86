"""Transfer learning through hubload.load: new heads, frozen backbones, partial loads, clear shape reports.

Both frameworks run the same checks on the embedded ``seed-mlp`` entry (head ``dense2.*``); the position
table case uses the real all-MiniLM-L6-v2 file; the input-channel case a generated ResNet-18 checkpoint;
the custom BERT head a tiny checkpoint generated from transformers' ``BertModel``. The BERT encoders are the
library classes (transformers' ``BertModel``, keras-hub's ``BertBackbone``) built from a config.json dict.
"""

from __future__ import annotations

import numpy as np
import pytest

import hubload
from hubload.errors import IncompatibleWeightsError

SEED_HEAD = ["dense2.weight", "dense2.bias"]


@pytest.fixture(scope="module")
def seed_ckpt():
    from importlib.resources import files

    from safetensors.numpy import load_file

    return load_file(str(files("hubload") / "data" / "seed-mlp" / "model.safetensors"))


def _canonical(model) -> dict[str, np.ndarray]:
    """name -> canonical-layout numpy array, for either framework."""
    from hubload.adapters import get_adapter

    adapter = get_adapter(model)
    out = {}
    for name, t in adapter.spec(model).items():
        if adapter.name == "torch":
            out[name] = t.handle.detach().cpu().numpy()
        else:
            arr = np.asarray(t.handle.numpy())
            out[name] = arr.T if arr.ndim == 2 else arr  # Dense kernels are [in, out] in Keras
    return out


def _trainable(model) -> dict[str, bool]:
    from hubload.adapters import get_adapter

    adapter = get_adapter(model)
    if adapter.name == "torch":
        return {n: p.requires_grad for n, p in model.named_parameters()}
    return {n: bool(t.handle.trainable) for n, t in adapter.spec(model).items()}


@pytest.fixture(params=["torch", "tf"])
def fw(request):
    pytest.importorskip("torch" if request.param == "torch" else "tensorflow")
    return request.param


def test_num_classes_rebuilds_head_and_reports_it_replaced(fw, seed_ckpt):
    model, report = hubload.load("seed-mlp", framework=fw, num_classes=3, return_report=True)
    assert report.ok
    assert report.replaced == SEED_HEAD
    assert not report.missing and not report.shape_mismatches and not report.unexpected
    assert sorted(m.key for m in report.matched) == ["dense1.bias", "dense1.weight"]
    weights = _canonical(model)
    assert weights["dense2.weight"].shape == (3, 64) and weights["dense2.bias"].shape == (3,)
    for name in ("dense1.weight", "dense1.bias"):
        np.testing.assert_array_equal(weights[name], seed_ckpt[name])
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    if fw == "torch":
        import torch

        out = model(torch.from_numpy(x)).detach().numpy()
    else:
        out = np.asarray(model(x))
    assert out.shape == (4, 3)


def test_same_num_classes_keeps_the_head(fw, seed_ckpt):
    model, report = hubload.load("seed-mlp", framework=fw, num_classes=10, return_report=True)
    assert report.replaced == []
    np.testing.assert_array_equal(_canonical(model)["dense2.weight"], seed_ckpt["dense2.weight"])


def test_freeze_backbone_trains_head_only(fw, seed_ckpt):
    model = hubload.load("seed-mlp", framework=fw, num_classes=3, freeze="backbone")
    assert _trainable(model) == {"dense1.weight": False, "dense1.bias": False,
                                 "dense2.weight": True, "dense2.bias": True}
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 64), dtype=np.float32), rng.integers(0, 3, 32)
    head_before = _canonical(model)["dense2.weight"].copy()
    if fw == "torch":
        import torch

        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    else:
        import keras

        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    after = _canonical(model)
    np.testing.assert_array_equal(after["dense1.weight"], seed_ckpt["dense1.weight"])
    assert not np.array_equal(after["dense2.weight"], head_before)


def test_freeze_globs(fw):
    model = hubload.load("seed-mlp", framework=fw, freeze=["dense1.weight"])
    assert _trainable(model) == {"dense1.weight": False, "dense1.bias": True,
                                 "dense2.weight": True, "dense2.bias": True}
    with pytest.raises(hubload.HubloadError, match="matches none"):
        hubload.load("seed-mlp", framework=fw, freeze=["encoder.*"])


def _seed_model(fw, in_features=64, num_classes=10):
    if fw == "torch":
        from hubload.zoo.torch_models import mlp
    else:
        from hubload.zoo.keras_models import mlp
    return mlp(in_features=in_features, hidden=64, num_classes=num_classes)


def test_exclude_leaves_tensors_alone(fw, seed_ckpt):
    model = _seed_model(fw)
    before = _canonical(model)
    _, report = hubload.load("seed-mlp", model=model, exclude=["dense2.*"], return_report=True)
    after = _canonical(model)
    for name in SEED_HEAD:
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(after["dense1.weight"], seed_ckpt["dense1.weight"])
    assert {(i.key, i.side) for i in report.ignored} == {(n, s) for n in SEED_HEAD for s in ("model", "checkpoint")}


def test_input_width_mismatch_is_a_clear_report(fw):
    report = hubload.check("seed-mlp", framework=fw, config={"in_features": 32})
    assert [(m.key, m.checkpoint_shape, m.model_shape) for m in report.shape_mismatches] == \
        [("dense1.weight", (64, 64), (64, 32))]
    assert not report.ok
    for strict in (True, False):  # shape mismatches are never skipped silently
        with pytest.raises(IncompatibleWeightsError) as info:
            hubload.load("seed-mlp", framework=fw, config={"in_features": 32}, strict=strict)
        assert "dense1.weight" in str(info.value) and "[64, 64]" in str(info.value) and "[64, 32]" in str(info.value)
        assert info.value.report.shape_mismatches == report.shape_mismatches
    # The documented way out: leave the first layer to the new input, load the rest.
    model, partial = hubload.load("seed-mlp", framework=fw, config={"in_features": 32}, exclude=["dense1.weight"],
                                  strict=False, return_report=True)
    assert sorted(m.key for m in partial.matched) == ["dense1.bias", "dense2.bias", "dense2.weight"]


def test_strict_false_loads_what_matches(seed_ckpt):
    """Missing-tensor bookkeeping is framework-independent (the compat report); torch shows it."""
    pytest.importorskip("torch")
    import torch

    from hubload.zoo.torch_models import MLP

    class Wider(MLP):
        def __init__(self):
            super().__init__(64, 64, 10)
            self.extra = torch.nn.Linear(10, 2)

    model = Wider()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleWeightsError):
        hubload.load("seed-mlp", model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    _, report = hubload.load("seed-mlp", model=model, strict=False, return_report=True)
    assert report.missing == ["extra.weight", "extra.bias"]
    np.testing.assert_array_equal(model.dense2.weight.detach().numpy(), seed_ckpt["dense2.weight"])


def test_resnet_with_one_input_channel(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from hubload.zoo.torch_models import resnet18

    torch.manual_seed(0)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18(num_classes=10).state_dict().items()}, str(path))
    model = resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    before = model.conv1.weight.detach().clone()
    report = hubload.check(path, model=model)
    assert [(m.key, m.checkpoint_shape, m.model_shape) for m in report.shape_mismatches] == \
        [("conv1.weight", (64, 3, 7, 7), (64, 1, 7, 7))]
    assert "[64, 3, 7, 7]" in report.render() and "[64, 1, 7, 7]" in report.render()
    with pytest.raises(IncompatibleWeightsError, match=r"conv1\.weight"):
        hubload.load(path, model=model, strict=False)
    assert torch.equal(model.conv1.weight, before)
    _, report = hubload.load(path, model=model, exclude=["conv1.weight"], return_report=True)
    assert report.ok and len(report.matched) == len(model.state_dict()) - 1


MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, type_vocab_size=2, layer_norm_eps=1e-12)


def _bert(fw, config):
    """transformers' BertModel (torch) or keras-hub's BertBackbone (tf) built from a config.json dict."""
    from hubload.adapters import hf_families

    if fw == "torch":
        transformers = pytest.importorskip("transformers")
        return hf_families.build(transformers.BertModel, config)
    keras_hub = pytest.importorskip("keras_hub")
    return hf_families.build(keras_hub.models.BertBackbone, config)


def test_longer_position_table_is_a_clear_report(fw, minilm_file):
    model = _bert(fw, {**MINILM, "max_position_embeddings": 1024})
    report = hubload.check(minilm_file, model=model)
    assert [(m.key, m.checkpoint_shape, m.model_shape) for m in report.shape_mismatches] == \
        [("embeddings.position_embeddings.weight", (512, 384), (1024, 384))]
    assert not report.missing and not report.unexpected
    with pytest.raises(IncompatibleWeightsError, match=r"position_embeddings"):
        hubload.load(minilm_file, model=model, strict=False)


# ---------------------------------------------------------------------- a custom head on the BERT encoder

TINY_BERT = dict(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=16, type_vocab_size=2)


@pytest.fixture(scope="module")
def tiny_bert_file(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert") / "tiny-bert.safetensors"
    save_file({k: v.contiguous() for k, v in _bert("torch", TINY_BERT).state_dict().items()}, str(path))
    return path


def _torch_classifier(num_classes):
    """The documented pattern: BertModel as ``backbone``, mean pooling, a Linear head as ``classifier``."""
    import torch

    from hubload.zoo.torch_models import mean_pool

    class SentenceClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _bert("torch", TINY_BERT)
            self.classifier = torch.nn.Linear(TINY_BERT["hidden_size"], num_classes)

        def forward(self, input_ids, attention_mask):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.classifier(mean_pool(hidden, attention_mask))

    return SentenceClassifier()


def _keras_classifier(encoder, num_classes):
    """The same head on a loaded BertBackbone: mean pooling of ``sequence_output``, a Dense ``classifier``."""
    import keras

    from hubload.zoo.keras_models import mean_pool

    class SentenceClassifier(keras.Model):
        def __init__(self):
            super().__init__()
            self.backbone = encoder
            self.classifier = keras.layers.Dense(num_classes)

        def call(self, inputs):
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            hidden = self.backbone({"token_ids": ids, "segment_ids": keras.ops.zeros_like(ids),
                                "padding_mask": mask})["sequence_output"]
            return self.classifier(mean_pool(hidden, mask))

    model = SentenceClassifier()
    model({"input_ids": np.zeros((1, 3), "int32"), "attention_mask": np.ones((1, 3), "int32")})
    return model


def test_custom_head_on_bert_encoder_in_both_frameworks(tiny_bert_file):
    pytest.importorskip("tensorflow")
    import torch

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (3, 7)).astype("int64")
    mask = np.ones((3, 7), "int64")
    mask[1, 4:] = 0
    head_w, head_b = rng.normal(size=(4, 16)).astype("float32"), rng.normal(size=4).astype("float32")

    # torch: the whole classifier loads from the encoder's file, the head excluded and the rest frozen.
    model, report = hubload.load(tiny_bert_file, model=_torch_classifier(4), exclude=["classifier.*"],
                                 freeze="backbone", return_report=True)
    n_tensors = len(_bert("torch", TINY_BERT).state_dict())
    assert report.ok and report.prefix_changes == [f"added 'backbone.' to {n_tensors} checkpoint keys"]
    assert {i.key for i in report.ignored if i.side == "model"} == {"classifier.weight", "classifier.bias"}
    assert {k for k, v in _trainable(model).items() if v} == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head_w))
        model.classifier.bias.copy_(torch.from_numpy(head_b))
        want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    # Keras: the backbone loads from the same file (Hub names), then the head goes on top of it.
    encoder, report = hubload.load(tiny_bert_file, model=_bert("tf", TINY_BERT), return_report=True)
    assert report.ok and len(report.matched) == n_tensors
    encoder.trainable = False
    kmodel = _keras_classifier(encoder, 4)
    assert [v.path for v in kmodel.trainable_weights] == [kmodel.classifier.kernel.path, kmodel.classifier.bias.path]
    kmodel.classifier.kernel.assign(head_w.T)
    kmodel.classifier.bias.assign(head_b)
    got = np.asarray(kmodel({"input_ids": ids.astype("int32"), "attention_mask": mask.astype("int32")}))
    assert np.abs(want).max() > 1e-2  # not two near-zero outputs
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_freeze_backbone_reaches_a_keras_hub_backbone(tiny_bert_file):
    pytest.importorskip("tensorflow")
    encoder, report = hubload.load(tiny_bert_file, model=_bert("tf", TINY_BERT), freeze="backbone",
                                   return_report=True)
    assert report.ok and encoder.weights and not encoder.trainable_weights
    part, _ = hubload.load(tiny_bert_file, model=_bert("tf", TINY_BERT), freeze=["embeddings.*"], return_report=True)
    frozen = {v.path for v in part.weights} - {v.path for v in part.trainable_weights}
    assert frozen and part.trainable_weights and all("embedding" in p for p in frozen)
