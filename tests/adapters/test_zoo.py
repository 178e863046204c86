"""The twin-architecture zoo (ResNet-18/50, the seed MLP, ``mean_pool``): canonical names, and numerical agreement
between the PyTorch and Keras twins. BERT is the library classes' job (tests/adapters/test_hub_models.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

from hubload.zoo import keras_models as zoo_keras, torch_models as zoo_torch  # noqa: E402
from hubload.adapters._keras_paths import keras_variable_paths  # noqa: E402

# Test-local copy of the Keras -> canonical rule table from the brief (the real one lives in
# hubload.layout); keeping it here makes these tests independent of the loader.
_LEAVES = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
           "moving_mean": "running_mean", "moving_variance": "running_var", "embeddings": "weight"}
_KERNEL_PERMS = {2: (1, 0), 4: (3, 2, 0, 1)}  # keras -> canonical (Dense [in,out]->[out,in]; HWIO->OIHW)


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


# ------------------------------------------------------------------------------------------ mean_pool


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


@pytest.mark.parametrize("factory", ["resnet18", "mlp"])
def test_factories_return_built_eval_models(factory):
    assert not getattr(zoo_torch, factory)().training
    keras_model = getattr(zoo_keras, factory)()
    assert keras_model.built and keras_variable_paths(keras_model)
