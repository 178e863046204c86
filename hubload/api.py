"""``hubload.load`` and ``hubload.check``: checkpoint → canonical layout → compatibility check → adapter.

    resolve source ─► build model (registry architecture) ─► pre-check (remote header, no download)
        ─► pull (verified cache) ─► read checkpoint lazily ─► check ─► apply (all or nothing)

The check always runs before the first tensor is copied; a strict failure leaves the model untouched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .cache import Cache
from .compat import CompatReport
from .compat import check as compat_check
from .errors import HubloadError
from .registry import RegistryArg
from .resolve import (
    _FULL_MODEL_FORMATS,
    Artifact,
    canonical_tensors,
    fetch_artifact,
    open_artifact,
    remote_safetensors_header,
    resolve_source,
    with_key,
)

__all__ = ["check", "inspect", "load"]

log = logging.getLogger("hubload")


def _framework_name(framework: str) -> str:
    """Normalise ``torch``/``pt``/``pytorch`` and ``tf``/``tensorflow``/``keras``."""
    from .adapters import ADAPTER_ALIASES

    name = ADAPTER_ALIASES.get(str(framework).lower())
    return name or str(framework).lower()


def _adapter(model: Any, framework: str | None) -> Any:
    """The adapter for ``model`` (inferred) or ``framework`` (by name)."""
    from .adapters import get_adapter

    if model is not None:
        adapter = get_adapter(model)
        if framework is not None and _framework_name(framework) != adapter.name:
            raise HubloadError(f"framework={framework!r} contradicts the model, a {type(model).__module__}."
                               f"{type(model).__name__} ({adapter.name}); drop framework= or pass a matching model")
        return adapter
    if framework is None:
        return None
    return get_adapter(_framework_name(framework))


def _replace_globs(art: Artifact, num_classes: int | None) -> tuple[str, ...]:
    """Head tensors to re-initialise instead of load: the entry's head when num_classes changes it."""
    if num_classes is None:
        return ()
    entry = art.entry
    if entry is None or not entry.head:
        raise HubloadError(f"{art.label}: num_classes= needs a registry entry that declares its classification "
                           "head (head: [globs]); for other checkpoints pass exclude=[...] for the head tensors")
    if entry.config.get("num_classes") == num_classes:
        return ()
    return tuple(entry.head)


def _build(art: Artifact, adapter: Any, config: Mapping[str, Any] | None, num_classes: int | None) -> Any:
    """Build the registry entry's architecture for the adapter's framework."""
    entry = art.entry
    if entry is None:
        raise HubloadError(f"{art.label}: not a registry entry, so hubload has no architecture to build; "
                           "pass model=your_model")
    arch = entry.architecture.get(adapter.name)
    if arch is None:
        have = ", ".join(entry.frameworks()) or "none"
        raise HubloadError(f"model {entry.id!r} has no {adapter.name} architecture (it has: {have}); pass "
                           f"model= to load into your own {adapter.name} model, or add architecture.{adapter.name} "
                           "to the registry entry")
    cfg = dict(entry.config)
    cfg.update(config or {})
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    return adapter.build(arch, cfg)


def _report(ckpt: Mapping[str, Any], model_spec: Mapping[str, Any], art: Artifact, model: Any, *,
            exclude: Iterable[str], replace: Iterable[str], strict: bool) -> CompatReport:
    """Run the compatibility checker with the entry's ignore globs."""
    return compat_check(ckpt, model_spec, exclude=tuple(exclude), ignore=tuple(art.ignore), replace=tuple(replace),
                        strict=strict, source=art.label, target=type(model).__name__)


def _remote_report(art: Artifact, model_spec: Mapping[str, Any], model: Any, *, cache: Cache, layout: str | None,
                   rename: Sequence[Any], exclude: Iterable[str], replace: Iterable[str], strict: bool,
                   offline: bool | None, token: str | bool | None) -> CompatReport | None:
    """The report from an uncached remote safetensors header (Range requests only), or None if that does not apply."""
    header = remote_safetensors_header(art, cache=cache, offline=offline, token=token)
    if header is None:
        return None
    from .layout import to_canonical

    ckpt = to_canonical(header.tensors, layout or art.layout or header.layout, rename=tuple(art.rename) + tuple(rename))
    log.info("%s: checked from the remote header (%d bytes) before any download", art.label, header.nbytes)
    return _report(ckpt, model_spec, art, model, exclude=exclude, replace=replace, strict=strict)


def _is_full_model(art: Artifact) -> bool:
    """A SavedModel folder or a .keras file (loads without a model)."""
    if art.format in _FULL_MODEL_FORMATS:
        return True
    p = art.path
    return p is not None and ((p.is_dir() and (p / "saved_model.pb").is_file()) or p.suffix == ".keras")


def _freeze(adapter: Any, model: Any, report: CompatReport, freeze: str | Sequence[str] | None,
            label: str) -> None:
    """Mark loaded tensors as not trainable: ``"backbone"`` = everything loaded except the head."""
    if freeze is None:
        return
    loaded = [m.key for m in report.matched]
    if isinstance(freeze, str) and freeze == "backbone":
        names = loaded
    else:
        globs = [freeze] if isinstance(freeze, str) else list(freeze)
        names = [n for n in loaded if any(fnmatch.fnmatchcase(n, g) for g in globs)]
        if not names:
            raise HubloadError(f"{label}: freeze={freeze!r} matches none of the {len(loaded)} loaded tensors; "
                               "use 'backbone' or globs of canonical names such as 'encoder.*'")
    adapter.freeze(model, names)


def _prepare(source: Any, *, model: Any, framework: str | None, registry: RegistryArg, config: Mapping[str, Any] | None,
             num_classes: int | None, sha256: str | None, strategy: Any = None
             ) -> tuple[Artifact, Any, Any, tuple[str, ...]]:
    """Resolve the source, pick the adapter and build the model when none is given."""
    art = resolve_source(source, registry=registry, sha256=sha256)
    adapter = _adapter(model, framework)
    replace = _replace_globs(art, num_classes)
    if adapter is None:
        return art, None, model, replace
    if strategy is not None and adapter.name != "tf":
        raise HubloadError(f"{art.label}: strategy= is a tf.distribute strategy; use it with framework='tf'")
    if model is None:
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = _build(art, adapter, config, num_classes)
    elif num_classes is not None or config:
        raise HubloadError("num_classes=/config= build the registry architecture; with model= given, size the "
                           "head yourself and pass exclude=[...] for the checkpoint's head tensors")
    return art, adapter, model, replace


def _all_ranks(adapter: Any, model: Any, label: str) -> Any:
    """For a model whose load is collective (sharded across torch.distributed ranks): the read-check-apply step
    succeeds on every rank or raises on every rank (:func:`hubload.distributed.all_or_nothing`); else a no-op."""
    from .distributed import all_or_nothing

    collective = getattr(adapter, "collective_load", None)  # optional adapter capability (the torch adapter has it)
    return all_or_nothing(label=label, enabled=None if collective is not None and collective(model) else False)


def load(source: str | os.PathLike[str], *, model: Any = None, framework: str | None = None, strict: bool = True,
         registry: RegistryArg = None, exclude: Iterable[str] = (), rename: Sequence[Any] = (),
         key: str | None = None, dtype: Any = "model", device: Any = None, layout: str | None = None,
         num_classes: int | None = None, freeze: str | Sequence[str] | None = None,
         config: Mapping[str, Any] | None = None, optimizer: Any = None, strategy: Any = None,
         return_report: bool = False,
         sha256: str | None = None, offline: bool | None = None, token: str | bool | None = None,
         progress: bool | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Load weights into a PyTorch or Keras model, checking compatibility before anything is copied.

    Args:
        source: A registry ID (``"all-minilm-l6-v2"``), ``hf://org/name[@revision]/file``, an ``https://`` or
            ``file://`` URL, or a local path: a checkpoint file, a folder with a sharded checkpoint, a TF
            checkpoint prefix (as ``tf.train.Checkpoint.save`` returns it) or its folder, a SavedModel folder
            or ``.keras`` file.
        model: The model to load into (``torch.nn.Module`` or ``keras.Model``/``tf.Module``); the framework
            is inferred from it. Omit it to build the registry entry's architecture.
        framework: ``torch``/``pt``/``pytorch`` or ``tf``/``tensorflow``/``keras`` when ``model`` is omitted.
        strict: Refuse missing, unexpected or mismatched tensors (raising before any copy). Non-strict loads
            what matches; a shape mismatch still raises unless ``exclude``\\ d.
        registry: Extra registry (path, list of paths, mapping or Registry) looked up first.
        exclude: Globs of canonical model tensor names to leave as they are.
        rename: Extra rename rules ``[{"pattern": regex, "replace": str}, ...]`` for checkpoint names.
        key: Nested state dict to pick in a pickle (``"state_dict"``, ``"model"``).
        dtype: ``"model"`` (cast to the model's dtypes, reported), ``"checkpoint"``, or a dtype name.
        device: torch only: device to materialise a ``meta`` model on, or to move the loaded model to.
        layout: Override the checkpoint's tensor convention (``torch`` or ``keras``).
        num_classes: Rebuild the entry's classification head with this many outputs (freshly initialised,
            reported as replaced).
        freeze: ``"backbone"`` (every loaded tensor) or globs of canonical names: set not trainable.
        config: Keyword overrides for the registry architecture.
        optimizer: TF only: restore this optimizer's state from a ``tf.train.Checkpoint`` of the same model.
        strategy: TF only: a ``tf.distribute`` strategy whose scope the registry architecture is built in
            (calling ``load`` inside ``with strategy.scope():`` does the same).
        return_report: Return ``(model, report)`` instead of the model.
        sha256: Expected sha256 of a bare URL source.
        offline: Use the cache only (default: ``HUBLOAD_OFFLINE``/``HF_HUB_OFFLINE``).
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        progress: Progress bars on stderr (default: only on a TTY).
        cache_dir: Cache root (default: ``HUBLOAD_CACHE``).

    Returns:
        The model with weights loaded, or ``(model, CompatReport)`` with ``return_report=True``. With no
        model/framework and a full-model artifact (SavedModel, ``.keras``), the loaded model.

    Raises:
        IncompatibleWeightsError: The checkpoint does not fit (``.report`` says how); nothing was copied.
        ModelNotFoundError, RegistryError, DownloadError, CheckpointError, UnsafeCheckpointError,
        MissingDependencyError: see their messages.
    """
    cache = Cache(cache_dir)
    art, adapter, model, replace = _prepare(source, model=model, framework=framework, registry=registry,
                                            config=config, num_classes=num_classes, sha256=sha256,
                                            strategy=strategy)
    art = with_key(art, key)
    if adapter is None:
        art = fetch_artifact(art, cache=cache, offline=offline, token=token, progress=progress)
        if _is_full_model(art):
            from .adapters import get_adapter

            loaded = get_adapter("tf").load_full(art.path)
            return (loaded, None) if return_report else loaded
        raise HubloadError(f"{art.label}: a weights checkpoint needs a model: pass model=your_model, or "
                           "framework='torch' / 'tf' to build the registry entry's architecture")

    model_spec = adapter.spec(model)

    def _fetch() -> Artifact:
        # An uncached remote safetensors is checked from its header first, so a misfit fails before gigabytes
        # move; under torch.distributed this (and the pull) runs once per node and every rank gets the outcome.
        pre = _remote_report(art, model_spec, model, cache=cache, layout=layout, rename=rename, exclude=exclude,
                             replace=replace, strict=strict, offline=offline, token=token)
        if pre is not None:
            pre.raise_if_incompatible(strict)
        return fetch_artifact(art, cache=cache, offline=offline, token=token, progress=progress)

    from .distributed import run_once_per_node

    art = run_once_per_node(_fetch, label=art.label)
    if _is_full_model(art):
        raise HubloadError(f"{art.label} is a whole saved model, not a weights file; load it without model=/"
                           "framework= to get the saved model itself")
    with _all_ranks(adapter, model, art.label), open_artifact(art) as reader:
        report = _report(canonical_tensors(reader, art, layout, rename), model_spec, art, model, exclude=exclude,
                         replace=replace, strict=strict)
        if optimizer is not None:
            if adapter.name != "tf" or reader.format != "tf-checkpoint":
                raise HubloadError("optimizer= restores optimizer state from a tf.train.Checkpoint into a Keras "
                                   f"model; {art.label} is a {reader.format} checkpoint for a {adapter.name} model")
            report = adapter.restore_native(model, art.path, optimizer=optimizer)
        else:
            report.raise_if_incompatible(strict)
            options: dict[str, Any] = {"dtype_policy": dtype}
            if adapter.name in ("torch", "tf"):  # built-ins reuse the spec computed above (a model walk less)
                options["model_spec"] = model_spec
            if adapter.name == "torch":
                options["device"] = device
            adapter.apply(model, report, reader, **options)
    if device is not None and adapter.name == "torch":
        model = model.to(device)
    _freeze(adapter, model, report, freeze, art.label)
    return (model, report) if return_report else model


def check(source: str | os.PathLike[str], *, model: Any = None, framework: str | None = None, strict: bool = True,
          registry: RegistryArg = None, exclude: Iterable[str] = (), rename: Sequence[Any] = (),
          key: str | None = None, layout: str | None = None, num_classes: int | None = None,
          config: Mapping[str, Any] | None = None, sha256: str | None = None, offline: bool | None = None,
          token: str | bool | None = None, progress: bool | None = None,
          cache_dir: str | os.PathLike[str] | None = None) -> CompatReport:
    """Compare a checkpoint with a model without loading anything.

    For an uncached single-file safetensors on an ``hf://`` or ``https://`` source only the header is read
    (HTTP Range requests); other remote checkpoints are pulled into the cache first.

    Args:
        source, model, framework, strict, registry, exclude, rename, key, layout, num_classes, config, sha256,
        offline, token, progress, cache_dir: as for :func:`load`.

    Returns:
        The CompatReport (``report.ok`` tells whether a strict load would succeed).
    """
    cache = Cache(cache_dir)
    art, adapter, model, replace = _prepare(source, model=model, framework=framework, registry=registry,
                                            config=config, num_classes=num_classes, sha256=sha256)
    if adapter is None:
        raise HubloadError(f"{art.label}: check needs a model to compare with: pass model= or framework=")
    art = with_key(art, key)
    model_spec = adapter.spec(model)
    report = _remote_report(art, model_spec, model, cache=cache, layout=layout, rename=rename, exclude=exclude,
                            replace=replace, strict=strict, offline=offline, token=token)
    if report is None:
        art = fetch_artifact(art, cache=cache, offline=offline, token=token, progress=progress)
        with open_artifact(art) as reader:
            report = _report(canonical_tensors(reader, art, layout, rename), model_spec, art, model, exclude=exclude,
                             replace=replace, strict=strict)
    return report


def inspect(source: str | os.PathLike[str], *, registry: RegistryArg = None, key: str | None = None,
            offline: bool | None = None, token: str | bool | None = None, progress: bool | None = None,
            cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The tensors of a checkpoint (name → TensorInfo: shape, dtype, bytes), without reading tensor data.

    An uncached remote single-file safetensors is read with Range requests only.
    """
    cache = Cache(cache_dir)
    art = resolve_source(source, registry=registry)
    art = with_key(art, key)
    header = remote_safetensors_header(art, cache=cache, offline=offline, token=token)
    if header is not None:
        return dict(header.tensors)
    art = fetch_artifact(art, cache=cache, offline=offline, token=token, progress=progress)
    if _is_full_model(art):
        raise HubloadError(f"{art.label} is a whole saved model; `inspect` reads weight checkpoints")
    with open_artifact(art) as reader:
        return dict(reader.tensors())

