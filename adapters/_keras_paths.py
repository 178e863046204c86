"""Natural names of a Keras model's variables: attribute paths for subclassed models, layer names otherwise.

``tf.train.Checkpoint`` names a subclassed model's variables by the attribute path that reaches them
(``dense1/kernel``), which is also what the twin PyTorch module calls them (``dense1.weight``). Keras 3's own
``Variable.path`` uses auto-generated layer names instead (``dense_3/kernel``) and Keras 3 does not track
Python lists of layers in TF checkpoints, so hubload walks the attributes itself.
"""

from __future__ import annotations

from typing import Any, Iterator

import keras

__all__ = ["keras_variable_owners", "keras_variable_paths"]

# Attributes of keras.layers.Layer that hold bookkeeping, never a user sublayer.
_SKIP_ATTRS = frozenset({"_tracker", "_layers", "_trainable_variables", "_non_trainable_variables",
                         "_metrics", "_seed_generators", "_inbound_nodes", "_outbound_nodes", "_losses",
                         "_self_unconditional_checkpoint_dependencies", "_functional", "_operations",
                         "_input_layers", "_output_layers", "_inputs", "_outputs", "_compile_metrics",
                         "_compile_loss", "optimizer", "_optimizer", "_loss_tracker"})


try:  # Keras 3 keeps the class private; a functional model is an instance of it (subclasses too)
    from keras.src.models.functional import Functional as _Functional
except ImportError:  # pragma: no cover - other Keras layouts
    _Functional = None


def _is_functional(layer: Any) -> bool:
    """True for functional/Sequential models, whose sublayers are named by ``layer.name``."""
    if isinstance(layer, keras.Sequential):
        return True
    return _Functional is not None and isinstance(layer, _Functional)


def _own_variables(layer: Any) -> Iterator[Any]:
    """Variables a layer owns directly (not those of its sublayers)."""
    yield from getattr(layer, "_trainable_variables", ())
    yield from getattr(layer, "_non_trainable_variables", ())


def _children(layer: Any) -> Iterator[tuple[str, Any]]:
    """(attribute path segment, sublayer) pairs, following lists/tuples/dicts of layers."""
    if _is_functional(layer):
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


def keras_variable_paths(model: Any) -> dict[str, Any]:
    """Map ``attr/path/leaf`` to each variable of a built Keras layer/model (see :func:`keras_variable_owners`)."""
    return {path: var for path, (var, _) in keras_variable_owners(model).items()}


def keras_variable_owners(model: Any) -> dict[str, tuple[Any, Any]]:
    """Map ``attr/path/leaf`` to each variable of a built Keras layer/model, each variable once.

    Leaf names are the Keras variable names (``kernel``, ``bias``, ``gamma``, ``moving_mean`` ...).
    A variable reachable by two paths (shared layers) keeps the first path found.

    Args:
        model: A built ``keras.layers.Layer`` (a ``keras.Model`` included).

    Returns:
        Ordered dict from slash-separated path to ``(keras.Variable, owning layer)``; the owner's class
        tells layout rules apart that names alone cannot (a Keras 3 depthwise kernel is called ``kernel``).
    """
    out: dict[str, tuple[Any, Any]] = {}
    seen_vars: set[int] = set()
    seen_layers: set[int] = set()

    def walk(layer: Any, prefix: str) -> None:
        if id(layer) in seen_layers:
            return
        seen_layers.add(id(layer))
        for var in _own_variables(layer):
            if id(var) in seen_vars:
                continue
            seen_vars.add(id(var))
            leaf = var.name.rsplit("/", 1)[-1]
            out[f"{prefix}{leaf}"] = (var, layer)
        for seg, sub in _children(layer):
            walk(sub, f"{prefix}{seg}/")

    walk(model, "")
    return out
