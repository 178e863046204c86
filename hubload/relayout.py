"""``hubload.convert`` (this module is ``hubload.relayout``): re-lay a checkpoint out for the other convention.

torch → keras needs to know what each canonical ``weight`` is (a Dense/Conv kernel, a norm's gamma, an
embedding table); a checkpoint alone does not say, so the rank and the name decide (documented in
:func:`keras_leaf_hint`) and every decision is listed in the returned summary.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import SAFETENSORS_DTYPES, canonical_dtype, to_numpy  # to_numpy re-exported
from .errors import CheckpointError, UsageError
from .registry import RegistryArg

__all__ = ["convert", "keras_leaf_hint", "to_numpy", "write_safetensors"]

log = logging.getLogger("hubload")


def keras_leaf_hint(name: str, ndim: int) -> str | None:
    """The Keras leaf a canonical tensor becomes: ``weight`` of rank 1 → gamma, rank 2 → kernel (or
    ``embeddings`` when the module name mentions embed), rank ≥ 3 → conv kernel; None drops it."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight":
        if ndim == 1:
            return "gamma"
        if ndim == 2 and "embed" in name.rsplit(".", 1)[0].lower():
            return "embeddings"
        return "kernel"
    if leaf == "num_batches_tracked":
        return None  # a torch BatchNorm counter with no Keras counterpart
    return {"bias": "bias", "running_mean": "moving_mean", "running_var": "moving_variance"}.get(leaf, leaf)


def _keras_leaf_hints(canon: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Keras leaf for every canonical tensor (see :func:`keras_leaf_hint`), and the dropped ones with why.

    A norm layer's ``bias`` is its ``beta``: that shows only next to its ``weight`` (a rank-1 gamma).
    """
    hints: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for name, ct in canon.items():
        hint = keras_leaf_hint(name, len(ct.shape))
        if hint is None:
            dropped[name] = "no Keras counterpart"
        else:
            hints[name] = hint
    for name in hints:
        module, _, leaf = name.rpartition(".")
        if leaf == "bias" and hints.get(f"{module}.weight" if module else "weight") == "gamma":
            hints[name] = "beta"
    return hints, dropped


def write_safetensors(path: str | os.PathLike[str], arrays: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write numpy arrays as a safetensors file (atomically); returns the file size."""
    import numpy as np

    tag_of = {name: tag for tag, (name, _) in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    blobs = []
    for name in sorted(arrays):
        arr = np.asarray(arrays[name])
        if not arr.flags.c_contiguous:  # not np.ascontiguousarray: it turns a 0-d scalar into shape [1]
            arr = arr.copy(order="C")
        dname = canonical_dtype(arr.dtype)
        if dname not in tag_of:
            raise CheckpointError(f"{name}: dtype {dname} cannot be stored in safetensors")
        header[name] = {"dtype": tag_of[dname], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in blobs:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    os.replace(tmp, out)
    return out.stat().st_size


def convert(source: str | os.PathLike[str], *, layout: str, out: str | os.PathLike[str],
            registry: RegistryArg = None, key: str | None = None, from_layout: str | None = None,
            rename: Sequence[Any] = (), offline: bool | None = None, model: Any = None) -> dict[str, Any]:
    """Rewrite a checkpoint in the ``torch`` or ``keras`` tensor convention as one safetensors file.

    Without ``model`` the file alone names the tensors (rank and name decide the Keras leaves). A Keras
    ``.weights.h5`` does not always say enough for that: a subclassed model's sublayers under its derived
    ``layers`` list and a keras-hub layer's named sublayers carry no class, so such a file converts under
    names a fresh model cannot match (its load then refuses, naming them). Pass ``model``, a model of the
    checkpoint's architecture (torch or Keras; its weights are not read or changed), and the tensors are
    paired with the model first, exactly as a load pairs them (by storage path for a ``.weights.h5``), then
    written under the model's canonical names: a keras-hub family backbone's file comes out under the Hub's
    names, which transformers loads.

    Args:
        source: Anything :func:`hubload.load` accepts as a weights source.
        layout: Target convention: ``torch`` (canonical state_dict names/shapes) or ``keras``.
        out: Output ``.safetensors`` path.
        registry: Extra registry layer(s) for IDs.
        key: Nested state-dict key for pickles.
        from_layout: Override the source's convention.
        rename: Extra rename rules for the source's names.
        offline: Use the cache only.
        model: A model that names the tensors (see above). With ``layout="keras"`` (a Keras model), each
            tensor is written under its variable's Keras path in the variable's own shape: no guess from
            names (:func:`keras_leaf_hint`) is made.

    Returns:
        A summary: ``out``, ``layout``, ``tensors`` (count), ``bytes``, ``names`` (source tensor name →
        name written) and ``dropped`` (canonical name → why it has no counterpart).
    """
    if layout not in ("torch", "keras"):
        raise UsageError(f"layout={layout!r}: use 'torch' or 'keras'")
    from .cache import Cache
    from .layout import apply_transform, from_canonical
    from .resolve import canonical_tensors, fetch_artifact, open_artifact, resolve_source, with_key
    from .safetensors_io import FLATTEN_ORDER_METADATA_KEY, LAYOUT_METADATA_KEY

    art = with_key(resolve_source(source, registry=registry), key)
    art = fetch_artifact(art, cache=Cache(), offline=offline)
    arrays: dict[str, Any] = {}
    names: dict[str, str] = {}
    dropped: dict[str, str] = {}
    with open_artifact(art) as reader:
        source_layout = from_layout or art.layout or reader.layout
        flatten_order = (getattr(reader, "metadata", None) or {}).get(FLATTEN_ORDER_METADATA_KEY) or \
            ("channels_last" if source_layout == "keras" else "channels_first")
        if model is not None:
            arrays, names = _by_model(model, reader, art, source_layout, from_layout, rename, layout)
            canon = {}
        else:
            canon = canonical_tensors(reader, art, from_layout, rename)
        targets: dict[str, tuple[str, Any]] = {}
        if layout == "torch":
            targets = {name: (name, None) for name in canon}
        else:
            hints, dropped = _keras_leaf_hints(canon)
            kept = {n: ct for n, ct in canon.items() if n in hints}
            targets = {n: (path, tr) for n, (path, tr, _) in from_canonical(kept, hints).items()}
        for name, (target, to_target) in targets.items():
            ct = canon[name]
            arr = apply_transform(to_numpy(reader.get(ct.source)), ct.transform)
            arrays[target] = apply_transform(arr, to_target)
            names[ct.source] = target
    size = write_safetensors(out, arrays, {"format": "pt" if layout == "torch" else "keras",
                                           LAYOUT_METADATA_KEY: layout, "converted_from": art.label,
                                           FLATTEN_ORDER_METADATA_KEY: flatten_order})
    return {"out": str(out), "layout": layout, "tensors": len(arrays), "bytes": size, "names": names,
            "dropped": dropped}


def _by_model(model: Any, reader: Any, art: Any, source_layout: str | None, from_layout: str | None,
              rename: Sequence[Any], layout: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The checkpoint's tensors paired with ``model`` as a load pairs them, under the model's canonical names
    and shapes (``layout="torch"``) or a Keras model's own variable paths and shapes (``layout="keras"``).

    Raises:
        IncompatibleWeightsError: The checkpoint does not fit the model (the report says how).
        UsageError: ``layout="keras"`` for a model that is not a Keras model, or a variable that is fed by a
            group of tensors.
    """
    from .adapters import get_adapter
    from .compat import check
    from .families import family_ignore, family_model_spec, family_renames
    from .layout import apply_transform
    from .resolve import canonical_tensors

    adapter = get_adapter(model)
    if layout == "keras" and adapter.native_layout != "keras":
        raise UsageError(f"convert(layout='keras', model=...) needs a Keras model for its variable paths, got a "
                         f"{type(model).__name__}; use layout='torch'")
    spec = family_model_spec(model, source_layout) or adapter.spec(model)
    canon = canonical_tensors(reader, art, from_layout, (*rename, *family_renames(model)))
    report = check(canon, spec, ignore=(*art.ignore, *family_ignore(model)), source=art.label,
                   target=type(model).__name__)
    report.raise_if_incompatible(True)
    arrays: dict[str, Any] = {}
    names: dict[str, str] = {}
    for m in report.matched:
        arrays[m.key] = apply_transform(to_numpy(reader.get(m.source)), m.transform)
        names[m.source] = m.key
    if layout == "keras":
        return _keras_paths(arrays, spec), {src: spec[key].native for src, key in names.items()}
    hub = family_model_spec(model, "torch")
    if hub is None or hub is spec or source_layout != "keras":
        return arrays, names
    # A keras-hub family backbone's own file: paired above by storage path, written under the Hub's names.
    hub_of = {id(v): name for name, t in hub.items()
              for v in ([p[0] for p in t.handle.ports] if hasattr(t.handle, "ports") else [t.handle])}
    return _hub_names(arrays, spec, hub), {src: hub_of.get(id(spec[key].handle), key) for src, key in names.items()}


def _keras_paths(arrays: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical tensors as the Keras model's variables hold them, keyed by their Keras paths."""
    from .layout import apply_transform

    out: dict[str, Any] = {}
    for key, arr in arrays.items():
        t = spec[key]
        if t.group is not None or not hasattr(t.handle, "assign") or hasattr(t.handle, "ports"):
            raise UsageError(f"{key}: the model's variable(s) {t.native} take a group of tensors; write the torch "
                             "layout (layout='torch') instead")
        out[t.native] = apply_transform(arr, t.transform)
    return out


def _hub_names(arrays: Mapping[str, Any], spec: Mapping[str, Any], hub: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors named by a backbone's generic spec, re-expressed in its family spec (the Hub's names), through the
    variables both specs point at: canonical -> the variable's Keras value -> the Hub tensor."""
    import numpy as np

    from .layout import apply_transform

    value_of: dict[int, Any] = {}
    for key, arr in arrays.items():
        t = spec[key]
        if t.group is not None or t.handle is None:
            raise UsageError(f"{key}: a grouped tensor has no Hub name; convert without model=")
        value_of[id(t.handle)] = apply_transform(arr, t.transform)
    out: dict[str, Any] = {}
    for name, t in hub.items():
        ports = getattr(t.handle, "ports", None)
        if ports is not None:  # one Hub tensor fed to several variables (GPT-2's fused c_attn)
            whole = np.empty(int(np.prod(t.shape)), dtype=value_of[id(ports[0][0])].dtype)
            for (var, _), index in zip(ports, t.handle.index):
                whole[index.ravel()] = np.asarray(value_of[id(var)]).ravel()
            out[name] = whole.reshape(t.shape)
        else:
            value = value_of[id(t.handle)]
            out[name] = t.transform.inverse().apply(value) if t.transform is not None else value
    return out
