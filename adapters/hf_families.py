"""Families of Hub models on both frameworks: transformers classes (torch) and keras-hub backbones (Keras).

``build(cls, config)`` builds a family's library class from a Hub ``config.json`` without any download:

- torch: ``<Family>Config(**config)`` then the transformers class; its ``state_dict`` names are the Hub
  checkpoint's names, so the torch adapter's generic spec lines them up;
- Keras: keras-hub's converter module (``keras_hub/src/utils/transformers/convert_<family>.py``) turns the
  config into the backbone's arguments.

``keras_spec(backbone, family)`` names every variable of a keras-hub backbone by the Hub checkpoint name it
comes from. It does not depend on Keras' own variable names: it runs the family converter's
``convert_weights`` against a recording loader, which captures, for each Hub name, the variable(s) and the
re-layout hook keras-hub itself uses. Each Hub tensor then becomes one :class:`~hubload.adapters.ModelTensor`:

- one variable and a hook that is a transpose/reshape: ``handle`` = the variable, ``transform`` = the
  equivalent :class:`hubload.layout.Transform` (found by running the hook on an index array);
- anything else (GPT-2's fused ``c_attn`` [in, 3*out] feeding three EinsumDense kernels): ``handle`` = a
  :class:`PortGroup`, which assigns each variable its slice with keras-hub's hook, all or nothing.

The Hub tensor's shape is inferred from the hook, too: the candidate shapes (1-D for biases and norm
scales; 2-D splits of the variables' dimensions for kernels and embeddings, torch ``Linear`` style
[out, in]) that the hook maps one-to-one onto the variables. A variable that no Hub name reaches, or a
shape that cannot be inferred uniquely, is an error, never a silent omission.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from hubload.adapters import ModelTensor, resolve_architecture
from hubload.checkpoint import canonical_dtype
from hubload.errors import HubloadError, MissingDependencyError, RegistryError
from hubload.families import FAMILIES, Family, family_for_class
from hubload.layout import Transform, apply_rename, compile_rename_rules

__all__ = ["PortGroup", "build", "keras_spec"]

logger = logging.getLogger("hubload")

_ONE_D = ("bias", "gamma", "beta", "scale", "moving_mean", "moving_variance")
Hook = Callable[[Any, list[int]], Any] | None


def build(cls: type, config: dict[str, Any]) -> Any:
    """Build a family's library class (a transformers model or a keras-hub backbone) from a config.json dict.

    Raises:
        RegistryError: The class is not in the family table or the config does not fit it.
        MissingDependencyError: transformers / keras-hub is not installed.
    """
    hit = family_for_class(cls)
    if hit is None:
        raise RegistryError(f"{cls.__module__}.{cls.__name__} is not in hubload's family table "
                            f"({', '.join(f.name for f in FAMILIES)})", field="architecture")
    family, side = hit
    config = dict(config or {})
    if side == "torch":
        config_cls = resolve_architecture(family.config_class)
        try:
            model = cls(config_cls(**config))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise RegistryError(f"{family.torch} rejected the config ({type(exc).__name__}: {exc})",
                                field="config") from exc
        model.eval()
        return model
    converter = _converter(family)
    try:
        try:
            kwargs = converter.convert_backbone_config(config)
        except KeyError:  # a partial config (hand-written registry entry): complete it as transformers would
            config = _with_defaults(family, config)
            kwargs = converter.convert_backbone_config(config)
        kwargs.update(_keras_config(family, config, kwargs))
        model = cls(**kwargs)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RegistryError(f"{family.keras} cannot be built from this config.json ({type(exc).__name__}: {exc}); "
                            f"keras-hub's {family.converter} converts it", field="config") from exc
    _exact_gelu(model, config.get("hidden_act", config.get("activation", family.hidden_act)))
    model._hubload_hf_config = config  # the converter's weight mapping needs it again (keras_spec)
    return model


def _keras_config(family: Family, config: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The backbone arguments the converter leaves out (``family.keras_config``), from config.json, else from
    transformers' default for the key, so the Keras side computes what the torch side does."""
    out: dict[str, Any] = {}
    for key, arg in family.keras_config:
        if arg in kwargs:
            continue
        value = config.get(key, _with_defaults(family, config).get(key))
        if value is None:
            raise KeyError(f"{key} (config.json) for the backbone's {arg}")
        out[arg] = value
    return out


def _exact_gelu(backbone: Any, act: Any) -> None:
    """Use the exact GELU where config.json asks for it: keras-hub's BertBackbone hard-codes the tanh
    approximation, which moves all-MiniLM-L6-v2's outputs by ~2e-3 from transformers' BertModel."""
    if act != "gelu":
        return
    import keras

    exact = keras.activations.get("gelu")  # approximate=False
    changed = 0
    for layer in backbone._flatten_layers(include_self=False, recursive=True):
        fn = getattr(layer, "activation", None)
        if callable(fn) and getattr(fn, "__name__", "") == "gelu_approximate":
            layer.activation = exact
            changed += 1
    if changed:
        logger.info("%s: %d layers switched to the exact GELU (config.json hidden_act: gelu)",
                    type(backbone).__name__, changed)


def _with_defaults(family: Family, config: dict[str, Any]) -> dict[str, Any]:
    """config.json completed with transformers' defaults (when installed), as transformers itself reads it."""
    try:
        config_cls = resolve_architecture(family.config_class)
    except (RegistryError, MissingDependencyError, ImportError):
        return config
    try:
        return {**config_cls(**config).to_dict(), **config}
    except (TypeError, ValueError, KeyError, AttributeError):
        return config


def _converter(family: Family) -> Any:
    """The family's keras-hub converter module."""
    try:
        return importlib.import_module(family.converter)
    except ImportError as exc:
        raise MissingDependencyError(f"the {family.name} Keras family ({family.converter})", "keras-hub",
                                     detail=str(exc)) from exc


class _Recorder:
    """A stand-in for keras-hub's ``SafetensorLoader`` that records ``port_weight`` calls, reading nothing."""

    def __init__(self) -> None:
        self.ports: dict[str, list[tuple[Any, Hook]]] = {}

    def get_tensor(self, hf_weight_key: str) -> Any:
        # Converters probe optional names (old BERT's LayerNorm.gamma); the current names are recorded, and
        # registry rename rules map old checkpoints onto them.
        raise KeyError(hf_weight_key)

    def port_weight(self, keras_variable: Any, hf_weight_key: str, hook_fn: Hook = None) -> None:
        self.ports.setdefault(hf_weight_key, []).append((keras_variable, hook_fn))


def _run(hook: Hook, x: np.ndarray, var: Any) -> np.ndarray:
    """keras-hub's hook on ``x`` for ``var`` (no hook = as is)."""
    return np.asarray(x if hook is None else hook(x, [int(d) for d in var.shape]))


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in var.shape)


def _leaf(var: Any) -> str:
    return str(getattr(var, "path", getattr(var, "name", ""))).rsplit("/", 1)[-1].split(":")[0]


def _cumprods(shape: tuple[int, ...]) -> set[int]:
    return set(itertools.accumulate(shape, lambda a, b: a * b))


def _owners(backbone: Any) -> dict[int, Any]:
    """id(variable) -> the layer that owns it (its own variables, not its sublayers')."""
    out: dict[int, Any] = {}
    for layer in backbone._flatten_layers(include_self=True, recursive=True):
        for v in [*getattr(layer, "_trainable_variables", ()), *getattr(layer, "_non_trainable_variables", ())]:
            out[id(v)] = layer
    return out


def _in_out(var: Any, owner: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The kernel's (input dims, output dims): Dense kernels are [in, out]; EinsumDense says by its equation."""
    shape = _shape(var)
    equation = getattr(owner, "equation", None)
    if isinstance(equation, str) and "->" in equation and "," in equation:
        inputs, kernel = equation.split("->")[0].split(",")[:2]
        if len(kernel) == len(shape):
            ins = tuple(d for d, c in zip(shape, kernel) if c in inputs)
            outs = tuple(d for d, c in zip(shape, kernel) if c not in inputs)
            return ins, outs
    if len(shape) == 2:
        return shape[:1], shape[1:]
    return None


def _candidates(ports: list[tuple[Any, Hook]], owner: Any) -> list[tuple[int, ...]]:
    """Plausible Hub shapes for the tensor feeding ``ports``: torch Linear [out, in] first, then [in, out]."""
    total = sum(math.prod(_shape(v)) for v, _ in ports)
    first = _shape(ports[0][0])
    if _leaf(ports[0][0]) in _ONE_D or len(first) <= 1:
        return [(total,)]
    out: list[tuple[int, ...]] = []
    split = _in_out(ports[0][0], owner)
    if split is not None and math.prod(split[0]) and total % math.prod(split[0]) == 0:
        n_in = math.prod(split[0])
        out += [(total // n_in, n_in), (n_in, total // n_in)]  # fused outputs (GPT-2 c_attn) multiply 'out'
    if len(first) >= 3 and len(ports) == 1:  # conv kernels: a permutation of the variable's axes
        out += [tuple(first[i] for i in perm) for perm in itertools.permutations(range(len(first)))]
    if len(first) == 2 and len(ports) == 1:
        out += [first, first[::-1], (1, *first)]  # (1, n, d): ViT's position table carries a batch axis
    return list(dict.fromkeys(out))


def _probe(cand: tuple[int, ...]) -> np.ndarray:
    """``arange`` in ``cand``'s shape: every element holds its own flat index (int32 when that fits: half the
    memory traffic of int64 for the same answer)."""
    n = math.prod(cand)
    return np.arange(n, dtype=np.int32 if n < 2**31 else np.int64).reshape(cand)


def _as_index(got: np.ndarray) -> np.ndarray | None:
    """A hook's output as integer indices: a hook that casts (to float) still carries them exactly, else None."""
    if got.dtype.kind in "iu":
        return got
    if got.dtype.kind != "f" or not np.array_equal(got, np.round(got)):
        return None
    return got.astype(np.int64)


def _hook_index(probe: np.ndarray, var: Any, hook: Hook) -> np.ndarray | None:
    """Where keras-hub's hook puts each element of ``probe`` in ``var`` (integer indices), or None when the
    hook refuses the probe's shape or the result does not fit the variable."""
    try:
        got = _run(hook, probe, var)
    except (ValueError, IndexError, TypeError):
        return None
    return _as_index(got) if got.shape == _shape(var) else None


def _maps_onto(cand: tuple[int, ...], ports: list[tuple[Any, Hook]]) -> list[np.ndarray] | None:
    """Index arrays (one per variable) if the hooks map a ``cand``-shaped tensor one-to-one onto the ports."""
    probe = _probe(cand)
    outs = []
    for var, hook in ports:
        got = _hook_index(probe, var, hook)
        if got is None:
            return None
        outs.append(got)
    seen = np.concatenate([o.ravel() for o in outs])
    if seen.size and (seen.min() < 0 or seen.max() >= probe.size):
        return None
    hit = np.zeros(probe.size, dtype=bool)
    hit[seen] = True
    if seen.size != probe.size or not hit.all():  # every element lands exactly once
        return None
    return outs


def _perm_of(probe: np.ndarray, index: np.ndarray) -> tuple[int, ...] | None:
    """The first axis permutation ``perm`` with ``probe.transpose(perm)``, read in C order, equal to ``index``
    (a hook that only permutes, splits and merges axes), or None.

    Each permutation is first tried on a few dozen positions (computed, not materialised), so only the right
    one is compared in full.
    """
    cand = probe.shape
    n = index.size
    if probe.size != n:
        return None
    strides = [math.prod(cand[k + 1:]) for k in range(len(cand))]
    sample = np.unique(np.linspace(0, n - 1, num=min(n, 61)).astype(np.int64)) if n else np.zeros(0, np.int64)
    got = index.flat[sample] if n else sample
    for perm in itertools.permutations(range(len(cand))):
        moved = tuple(cand[i] for i in perm)
        coords = np.unravel_index(sample, moved) if n else ()
        want = sum((c * strides[p] for c, p in zip(coords, perm)), np.zeros(len(sample), np.int64))
        if not np.array_equal(want, got):
            continue
        if np.array_equal(probe.transpose(perm), np.reshape(index, moved)):
            return perm
    return None


def _single_port(cand: tuple[int, ...], var: Any, hook: Hook) -> tuple[np.ndarray, Transform | None] | None:
    """(index array, Transform canonical → Keras) when keras-hub's hook is a natural re-layout of a
    ``cand``-shaped tensor onto ``var`` (axes permuted, then split or merged, never scrambled), else None.

    A permutation of the probe is one-to-one by construction, so no separate coverage pass is needed.
    """
    probe = _probe(cand)
    index = _hook_index(probe, var, hook)
    if index is None:
        return None
    perm = _perm_of(probe, index)
    if perm is None:
        return None
    moved = tuple(cand[i] for i in perm)
    a, b = _cumprods(moved), _cumprods(index.shape)
    if not (a <= b or b <= a):  # the regrouping splits and merges axes at once: not a plain split/merge
        return None
    identity = perm == tuple(range(len(cand)))
    if moved == index.shape:
        return index, None if identity else Transform(perm=perm)
    return index, Transform(perm=None if identity else perm, reshape=index.shape, in_shape=cand)


class PortGroup:
    """One Hub tensor feeding several Keras variables (a fused projection), assigned as one.

    Behaves enough like a variable for the Keras adapter: ``shape`` and ``dtype`` of the Hub tensor,
    ``assign`` (each variable gets its part through keras-hub's hook), ``numpy`` (the parts put back
    together), ``trainable``.
    """

    def __init__(self, name: str, shape: tuple[int, ...], ports: list[tuple[Any, Hook]],
                 index: list[np.ndarray]) -> None:
        self.name = name
        self.shape = shape
        self.ports = ports
        self.index = index
        self.dtype = ports[0][0].dtype
        self.path = " + ".join(str(v.path) for v, _ in ports)

    def assign(self, value: Any) -> None:
        """Split ``value`` (Hub layout) into the variables; every part is computed before the first assign."""
        arr = np.asarray(value)
        if arr.shape != self.shape:
            raise ValueError(f"{self.name}: expected shape {list(self.shape)}, got {list(arr.shape)}")
        parts = [_run(hook, arr, var) for var, hook in self.ports]
        for (var, _), part in zip(self.ports, parts):
            var.assign(part.astype(np.dtype(var.dtype), copy=False))

    def numpy(self) -> np.ndarray:
        """The Hub tensor the variables hold now."""
        out = np.empty(math.prod(self.shape), dtype=np.dtype(self.dtype))
        for (var, _), idx in zip(self.ports, self.index):
            out[idx.ravel()] = np.asarray(var.numpy()).ravel()
        return out.reshape(self.shape)

    @property
    def trainable(self) -> bool:
        return all(v.trainable for v, _ in self.ports)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        for v, _ in self.ports:
            v.trainable = value


def _fallback_config(backbone: Any) -> dict[str, Any]:
    """The config keys converters read in ``convert_weights``, from a backbone built without a config.json."""
    hidden = getattr(backbone, "hidden_dim", None)
    return {"n_embd": hidden, "hidden_size": hidden, "num_attention_heads": getattr(backbone, "num_heads", None),
            "tie_word_embeddings": getattr(backbone, "tie_word_embeddings", True)}


# (hook code + closure values, variable shapes, owner equation) -> (Hub shape, index arrays, transform): every
# encoder layer ports its tensors with the same hooks, and the index probes cost a pass over each tensor.
_INFERRED: dict[Any, tuple[tuple[int, ...], list[np.ndarray], Transform | None]] = {}


def _hook_key(hook: Hook) -> Any:
    if hook is None:
        return None
    code = getattr(hook, "__code__", None)
    cells = tuple(c.cell_contents for c in getattr(hook, "__closure__", None) or ())
    try:
        hash(cells)
    except TypeError:
        return id(hook)  # unhashable closure: no sharing, still correct
    return (code, cells, getattr(hook, "__defaults__", None)) if code is not None else id(hook)


def _inferred(ports: list[tuple[Any, Hook]], owner: Any, backbone: Any, name: str, family: Family
              ) -> tuple[tuple[int, ...], list[np.ndarray], Transform | None]:
    """The Hub shape of the tensor feeding ``ports``, the index arrays of keras-hub's hooks, the one-port
    transform; inferred once per kind of port (see :data:`_INFERRED`)."""
    key = (tuple(_hook_key(h) for _, h in ports), tuple(_shape(v) for v, _ in ports),
           getattr(owner, "equation", None), _leaf(ports[0][0]))
    shareable = not any(isinstance(k, int) for k in key[0])  # an id() key is never shared (ids are reused)
    hit = _INFERRED.get(key) if shareable else None
    if hit is not None:
        return hit
    result = None
    for cand in _candidates(ports, owner):  # in order of preference: the first that fits is taken
        if len(ports) == 1:
            single = _single_port(cand, *ports[0])
            if single is not None:
                result = (cand, [single[0]], single[1])
                break
        else:
            index = _maps_onto(cand, ports)
            if index is not None:
                result = (cand, index, None)
                break
    if result is None:
        raise HubloadError(f"{type(backbone).__name__}: cannot infer the Hub shape of {name!r} from keras-hub's "
                           f"{family.converter}; please report it")
    if shareable and len(_INFERRED) < 4096:
        _INFERRED[key] = result
    return result


def keras_spec(backbone: Any, family: Family) -> dict[str, ModelTensor]:
    """Every variable of a keras-hub family backbone, named by the Hub checkpoint tensor it loads from.

    Raises:
        HubloadError: A variable is reached by no Hub name, or a Hub tensor's shape cannot be inferred.
    """
    converter = _converter(family)
    config = getattr(backbone, "_hubload_hf_config", None) or _fallback_config(backbone)
    rec = _Recorder()
    converter.convert_weights(backbone, rec, config)
    owners = _owners(backbone)
    out: dict[str, ModelTensor] = {}
    reached: set[int] = set()
    renames = compile_rename_rules(family.renames)
    for hub_name, ports in rec.ports.items():
        name = apply_rename(hub_name, renames)
        if name in out:
            raise HubloadError(f"{type(backbone).__name__}: Hub tensors {hub_name!r} and another both become {name!r} "
                               f"under the {family.name} family's renames; please report it")
        var = ports[0][0]
        if len(ports) == 1 and ports[0][1] is None:  # no hook: the Hub tensor is the variable, as it is
            cand, index, transform = _shape(var), None, None
        else:
            cand, index, transform = _inferred(ports, owners.get(id(var)), backbone, name, family)
        if len(ports) == 1 and (transform is not None or tuple(cand) == _shape(var)):
            out[name] = ModelTensor(name, cand, canonical_dtype(var.dtype), str(var.path), transform,
                                    f"keras-hub {family.name}", var)
        else:
            group = PortGroup(name, cand, ports, index)
            out[name] = ModelTensor(name, cand, canonical_dtype(var.dtype), group.path, None,
                                    f"keras-hub {family.name} (split)", group)
        reached.update(id(v) for v, _ in ports)
    missed = [str(w.path) for w in backbone.weights if id(w) not in reached]
    if missed:
        raise HubloadError(f"{type(backbone).__name__}: {len(missed)} variable(s) are loaded from no Hub tensor by "
                           f"keras-hub's {family.converter}: {', '.join(missed[:5])}; refusing a partial spec")
    return out
