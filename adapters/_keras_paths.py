"""A Keras model's variables by structure, walked the way ``keras.saving.saving_lib`` walks it.

Keras' ``_save_state`` visits a model's saveables depth first: a Functional/Sequential model's ``layers``
first, then every attribute in sorted order (private ones last), each saveable once; lists, tuples and
dicts are entered with class-name counters (``dense``, ``dense_1``); each saveable writes its own state
with ``save_own_variables(store)`` into ``<path>/vars/<i>``. :func:`walk` runs the same walk, calling each
layer's own ``save_own_variables`` into a recording store, so every entry carries

* ``structural``: the exact ``.weights.h5`` dataset path (``layers/dense_1/vars/0``), and
* ``segments``: the canonical module path: attribute names, list indices (as ``nn.ModuleList``), a
  functional model's layer names, except auto-generated ones (``dense_7``), which differ between two
  instances of one architecture and are replaced by the container key (``dense_1``); dict entries as
  :func:`container_segments` says (Keras saves a dict as the list of its values: the keys are not part of
  the structure, so a file cannot tell them).

Two instances of one architecture therefore agree, whatever their global layer names. Variables that are
state but not weights (seed generators, optimizer and metric variables) are returned apart, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import keras

from hubload.errors import MissingDependencyError
from hubload.keras_layers import container_segments, functional_segments, snake_case

try:  # private, but the walk must match Keras' own exactly
    from keras.src.saving.keras_saveable import KerasSaveable
    from keras.src.saving.saving_lib import _walk_saveable
except ImportError:  # pragma: no cover - Keras layouts without saving_lib
    KerasSaveable = None
    _walk_saveable = None


def _prime_skipsets() -> None:
    """Fill the cache ``saving_lib.get_attr_skipset`` reads, so each walk does not build throw-away layers.

    Keras 3.15's ``get_attr_skipset(obj_type)`` stores its result under ``saving_attr_skipset_<type>`` but
    looks it up under ``saving_attr_skiplist_<type>``: the cache never hits, and every saveable visited
    instantiates a reference ``Layer()`` to take its ``dir()`` (about 1 ms each; 60 ms for a MiniLM).
    Storing Keras' own result under the name it reads changes nothing but the time (the value is the same
    function's output, and ``keras.backend.clear_session`` clears both).
    """
    try:
        from keras.src.backend.common import global_state
        from keras.src.saving.saving_lib import get_attr_skipset
    except ImportError:  # pragma: no cover - other Keras layouts: no cache to prime
        return
    for obj_type in ("Layer", "Functional", "Sequential", "Operation"):
        if global_state.get_global_attribute(f"saving_attr_skiplist_{obj_type}") is None:
            try:
                skipset = get_attr_skipset(obj_type)
            except Exception:  # noqa: BLE001 - a Keras without this type: leave its lookup to Keras
                continue
            global_state.set_global_attribute(f"saving_attr_skiplist_{obj_type}", skipset)

__all__ = ["KerasEntry", "attribute_entries", "keras_variable_owners", "keras_variable_paths", "walk"]


@dataclass(frozen=True)
class KerasEntry:
    """One value a layer saves with ``save_own_variables``.

    Attributes:
        value: The saved object (a ``keras.Variable`` for weights).
        owner: The layer (or other saveable) that saved it.
        structural: ``.weights.h5`` dataset path (``layers/dense_1/vars/0``).
        segments: Canonical module path of the owner.
        key: Store key (``"0"``, ``"1"`` ...).
        leaf: Variable name (``kernel``) or the key when the value is not a variable.
    """

    value: Any
    owner: Any
    structural: str
    segments: tuple[str, ...]
    key: str
    leaf: str


_AUTO_VARIABLE = re.compile(r"variable(_\d+)?")


class _Recorder(dict):
    """A ``save_own_variables`` store that keeps the objects instead of writing them."""

    def __bool__(self) -> bool:
        return True


def _unique(name: str, used: dict[str, int]) -> str:
    """saving_lib ``_get_unique_name``."""
    if name in used:
        used[name] += 1
        return f"{name}_{used[name]}"
    used[name] = 0
    return name


def walk(model: Any, layers: list[tuple[Any, tuple[str, ...]]] | None = None) -> list[KerasEntry]:
    """Every value the model's saveables save, in saving_lib order, with structural and canonical paths.

    Args:
        model: A built Keras layer or model.
        layers: If given, every visited saveable is appended as ``(object, canonical segments)``.

    Returns:
        The entries (weights, seed-generator state, optimizer variables ...), each saved object once.

    Raises:
        MissingDependencyError: This Keras has no ``saving_lib`` walk.
    """
    if _walk_saveable is None:
        raise MissingDependencyError(f"keras {keras.__version__}", "tf",
                                     detail="keras.src.saving.saving_lib is missing; hubload needs Keras 3 to name "
                                            "a model's variables")
    _prime_skipsets()
    out: list[KerasEntry] = []
    visited: set[int] = set()

    def own(obj: Any, inner: str, segs: tuple[str, ...]) -> None:
        if not hasattr(obj, "save_own_variables"):
            return
        store = _Recorder()
        obj.save_own_variables(store)
        for key, value in store.items():
            leaf = getattr(value, "name", None) if isinstance(value, keras.Variable) else None
            leaf = (leaf or key).rsplit("/", 1)[-1]
            if _AUTO_VARIABLE.fullmatch(leaf):  # add_weight() without a name: "variable_18" differs per instance
                leaf = key
            out.append(KerasEntry(value, obj, f"{inner}/vars/{key}" if inner else f"vars/{key}", segs, key, leaf))

    def visit(obj: Any, inner: str, segs: tuple[str, ...]) -> None:
        if id(obj) in visited:
            return
        own(obj, inner, segs)
        visited.add(id(obj))
        if layers is not None:
            layers.append((obj, segs))
        functional = obj._obj_type() in ("Sequential", "Functional")
        for attr, child in _walk_saveable(obj):
            path = f"{inner}/{attr}" if inner else attr
            if isinstance(child, KerasSaveable):
                visit(child, path, (*segs, attr))
            elif isinstance(child, (list, dict, tuple)):
                if functional and attr == "layers":
                    container(child, path, segs, set(), functional=True)
                elif attr == "layers" and isinstance(child, list):
                    # A subclassed model's derived ``layers`` list: Keras saves sublayers whose attribute sorts
                    # after "layers" under it; their canonical name stays the attribute path.
                    by_id = {id(sub): tuple(seg.split("/")) for seg, sub in _children(obj)}
                    container(child, path, segs, set(), attrs=by_id)
                else:
                    container(child, path, (*segs, attr), set())

    def container(items: Any, inner: str, segs: tuple[str, ...], seen: set[int], functional: bool = False,
                  attrs: dict[int, tuple[str, ...]] | None = None) -> None:
        if id(items) in seen:
            return
        seen.add(id(items))
        used: dict[str, int] = {}
        is_dict = isinstance(items, dict)
        values = list(items.values()) if is_dict else list(items)
        keyed: list[tuple[int, Any, str]] = []
        for i, item in enumerate(values):
            if isinstance(item, KerasSaveable):
                keyed.append((i, item, _unique(snake_case(type(item).__name__), used)))
            elif isinstance(item, (list, dict, tuple)):
                keyed.append((i, item, _unique("container", used)))
        if functional:
            names = functional_segments([(k, getattr(it, "name", None) if isinstance(it, KerasSaveable) else None)
                                         for _, it, k in keyed])
        elif is_dict:
            names = container_segments([k for _, _, k in keyed])
        else:
            names = [str(i) for i, _, _ in keyed]
        for (_, item, key), seg in zip(keyed, names):
            path = f"{inner}/{key}"
            sub = attrs.get(id(item), ("layers", seg)) if attrs is not None else (seg,)
            if isinstance(item, KerasSaveable):
                visit(item, path, (*segs, *sub))
            else:
                container(item, path, (*segs, *sub), seen)

    visit(model, "", ())
    return out


# Attributes of keras.layers.Layer that hold bookkeeping, never a user sublayer.
_SKIP_ATTRS = frozenset({"_tracker", "_layers", "_trainable_variables", "_non_trainable_variables",
                         "_metrics", "_seed_generators", "_inbound_nodes", "_outbound_nodes", "_losses",
                         "_self_unconditional_checkpoint_dependencies", "_functional", "_operations",
                         "_input_layers", "_output_layers", "_inputs", "_outputs", "_compile_metrics",
                         "_compile_loss", "optimizer", "_optimizer", "_loss_tracker"})


def _own_variables(layer: Any) -> Iterator[Any]:
    """Variables a layer owns directly (not those of its sublayers)."""
    yield from getattr(layer, "_trainable_variables", ())
    yield from getattr(layer, "_non_trainable_variables", ())


def _children(layer: Any) -> Iterator[tuple[str, Any]]:
    """(attribute path segment, sublayer) pairs, following lists/tuples/dicts of layers."""
    if layer._obj_type() in ("Sequential", "Functional"):
        for sub in layer.layers:
            yield sub.name, sub
        return
    for attr, value in vars(layer).items():
        if attr in _SKIP_ATTRS or attr.startswith("_self_"):  # TF tracking bookkeeping
            continue
        if isinstance(value, keras.layers.Layer):
            yield attr, value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    yield f"{attr}/{i}", item
        elif isinstance(value, dict):
            for k, item in value.items():
                if isinstance(item, keras.layers.Layer):
                    yield f"{attr}/{k}", item



def attribute_entries(model: Any) -> list[KerasEntry]:
    """Weights reachable through plain attributes, for the ones saving_lib's walk skips.

    Keras skips attributes that shadow a ``Layer`` property (a sublayer called ``output``, as Hugging Face's
    BERT modules have); ``model.save_weights`` then leaves those variables out, but they are weights, and
    hubload names them by their attribute path (``structural`` is empty: no ``.weights.h5`` stores them).
    """
    out: list[KerasEntry] = []
    seen: set[int] = set()

    def visit(layer: Any, segs: tuple[str, ...]) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        for var in _own_variables(layer):
            out.append(KerasEntry(var, layer, "", segs, "", var.name.rsplit("/", 1)[-1]))
        for seg, sub in _children(layer):
            visit(sub, (*segs, *seg.split("/")))

    visit(model, ())
    return out


def keras_variable_owners(model: Any) -> dict[str, tuple[Any, Any]]:
    """Map ``segment/.../leaf`` to ``(variable, owning layer)`` for each of the model's weights.

    Args:
        model: A built ``keras.layers.Layer`` (a ``keras.Model`` included).

    Returns:
        Slash-separated canonical module path plus the Keras leaf -> ``(keras.Variable, owner)``, in
        saving_lib order; weights only (seed-generator, optimizer and metric state left out).
    """
    weights = {id(v) for v in model.weights}
    entries = [e for e in walk(model) if id(e.value) in weights]
    saved = {id(e.value) for e in entries}
    entries += [e for e in attribute_entries(model) if id(e.value) in weights and id(e.value) not in saved]
    return {"/".join((*e.segments, e.leaf)): (e.value, e.owner) for e in entries}


def keras_variable_paths(model: Any) -> dict[str, Any]:
    """Map ``attr/path/leaf`` to each weight of a built Keras model (see :func:`keras_variable_owners`)."""
    return {path: var for path, (var, _) in keras_variable_owners(model).items()}
