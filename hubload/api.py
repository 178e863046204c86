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
from .errors import HubloadError, UsageError
from .families import family_ignore, family_model_spec, family_renames
from .registry import RegistryArg
from .verification import apply_verified, live_model, live_reader, make_plan, review
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
            raise UsageError(f"framework={framework!r} contradicts the model, a {type(model).__module__}."
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
        raise UsageError(f"{art.label}: num_classes= needs a registry entry that declares its classification "
                         "head (head: [globs]); for other checkpoints pass exclude=[...] for the head tensors")
    if entry.config.get("num_classes") == num_classes:
        return ()
    return tuple(entry.head)


def _build(art: Artifact, adapter: Any, config: Mapping[str, Any] | None, num_classes: int | None) -> Any:
    """Build the registry entry's architecture for the adapter's framework."""
    entry = art.entry
    if entry is None:
        raise UsageError(f"{art.label}: not a registry entry, so hubload has no architecture to build; "
                         "pass model=your_model")
    arch = entry.architecture.get(adapter.name)
    if arch is None:
        have = ", ".join(entry.frameworks()) or "none"
        raise UsageError(f"model {entry.id!r} has no {adapter.name} architecture (it has: {have}); pass "
                         f"model= to load into your own {adapter.name} model, or add architecture.{adapter.name} "
                         "to the registry entry")
    cfg = dict(entry.config)
    cfg.update(config or {})
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    return adapter.build(arch, cfg)


def _flatten_order(reader: Any) -> str | None:
    """The flatten order a checkpoint declares (files written by ``hubload convert``), else None."""
    from .safetensors_io import FLATTEN_ORDER_METADATA_KEY

    metadata = getattr(reader, "metadata", None)
    return metadata.get(FLATTEN_ORDER_METADATA_KEY) if isinstance(metadata, dict) else None


def _spec_layout(art: Artifact, layout: str | None) -> str | None:
    """The checkpoint's layout as far as it is known before the file is read (Keras formats are Keras layout)."""
    if layout or art.layout:
        return layout or art.layout
    if art.format in ("keras-weights", "tf-checkpoint"):
        return "keras"
    p = art.path
    if p is not None and (p.name.endswith(".h5") or p.with_name(p.name + ".index").exists()
                          or (p.is_dir() and any(p.glob("*.index")))):
        return "keras"  # a local Keras weights file or TF checkpoint (prefix or folder)
    return None


def _report(ckpt: Mapping[str, Any], model_spec: Mapping[str, Any], art: Artifact, model: Any, *,
            exclude: Iterable[str], replace: Iterable[str], strict: bool) -> CompatReport:
    """Run the compatibility checker with the entry's ignore globs."""
    return compat_check(ckpt, model_spec, exclude=tuple(exclude), ignore=(*art.ignore, *family_ignore(model)),
                        replace=tuple(replace),
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
            raise UsageError(f"{label}: freeze={freeze!r} matches none of the {len(loaded)} loaded tensors; "
                             "use 'backbone' or globs of canonical names such as 'encoder.*'")
    adapter.freeze(model, names)


def _prepare(source: Any, *, model: Any, framework: str | None, registry: RegistryArg, config: Mapping[str, Any] | None,
             num_classes: int | None, sha256: str | None, strategy: Any = None, hub: Mapping[str, Any] | None = None
             ) -> tuple[Artifact, Any, Any, tuple[str, ...]]:
    """Resolve the source, pick the adapter and build the model when none is given."""
    art = resolve_source(source, registry=registry, sha256=sha256, **(hub or {}))
    adapter = _adapter(model, framework)
    replace = _replace_globs(art, num_classes)
    if adapter is None:
        return art, None, model, replace
    scope = adapter.build_scope(strategy) if strategy is not None else contextlib.nullcontext()
    if model is None:
        with scope:
            model = _build(art, adapter, config, num_classes)
    elif num_classes is not None or config:
        raise UsageError("num_classes=/config= build the registry architecture; with model= given, size the "
                         "head yourself and pass exclude=[...] for the checkpoint's head tensors")
    return art, adapter, model, replace


def _all_ranks(collective: bool, label: str) -> Any:
    """For a load that is collective (a model sharded across torch.distributed ranks, ``Plan.collective``): the
    read-check-apply step succeeds on every rank or raises on every rank
    (:func:`hubload.distributed.all_or_nothing`); else a no-op."""
    from .distributed import all_or_nothing

    return all_or_nothing(label=label, enabled=None if collective else False)


def load(source: str | os.PathLike[str], *, model: Any = None, framework: str | None = None, strict: bool = True,
         registry: RegistryArg = None, exclude: Iterable[str] = (), rename: Sequence[Any] = (),
         key: str | None = None, dtype: Any = "model", device: Any = None, layout: str | None = None,
         num_classes: int | None = None, freeze: str | Sequence[str] | None = None,
         config: Mapping[str, Any] | None = None, optimizer: Any = None, strategy: Any = None,
         return_report: bool = False, reference: Any = None, example_inputs: Any = None, verify: Any = "auto",
         sha256: str | None = None, offline: bool | None = None, token: str | bool | None = None,
         progress: bool | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Load weights into a PyTorch or Keras model, checking compatibility before anything is copied.

    Args:
        source: A registry ID (``"all-minilm-l6-v2"``), ``hf://org/name[@revision]/file``, an ``https://`` or
            ``file://`` URL, or a local path: a checkpoint file, a folder with a sharded checkpoint, a TF
            checkpoint prefix (as ``tf.train.Checkpoint.save`` returns it) or its folder, a SavedModel folder
            or ``.keras`` file. Or a live ``torch.nn.Module`` / Keras model: its weights are the checkpoint
            (in its own framework's layout) and it is the reference for comparison and verification.
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
        reference: A live model that produced the checkpoint: its layers are compared with the target's before
            the copy, and its outputs with the target's after it.
        example_inputs: Inputs (one array or a list, in the target's convention: NHWC for a Keras image model)
            to verify on; default: from the shape a model was built/called with, else the entry's probe.
        verify: ``"auto"`` (verify when a reference or a probe exists), ``True`` (require one) or ``False``.
            A failed verification restores the model and raises, naming the first divergent layer.
        sha256: Expected sha256 of a bare URL source.
        offline: Use the cache only (default: ``HUBLOAD_OFFLINE``/``HF_HUB_OFFLINE``).
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        progress: Progress bars on stderr (default: only on a TTY).
        cache_dir: Cache root (default: ``HUBLOAD_CACHE``).

    Returns:
        The model with weights loaded, or ``(model, CompatReport)`` with ``return_report=True``. With no
        model/framework and a full-model artifact (SavedModel, ``.keras``), the loaded model.

    Raises:
        IncompatibleWeightsError: The checkpoint does not fit, a layer computes differently from the reference,
            or the verification failed (``.report`` says how); the model is as it was.
        UsageError: Bad arguments (raised before anything is downloaded).
        ModelNotFoundError, RegistryError, DownloadError, CheckpointError, UnsafeCheckpointError,
        MissingDependencyError: see their messages.
    """
    _check_args(dtype=dtype, verify=verify, freeze=freeze)
    cache = Cache(cache_dir)
    live = live_model(source)
    if live is not None:
        return _load_live(source, live, model=model, framework=framework, strict=strict, exclude=exclude,
                          rename=rename, dtype=dtype, device=device, freeze=freeze, return_report=return_report,
                          reference=reference, example_inputs=example_inputs, verify=verify)
    early = _adapter(model, framework)
    if early is not None:  # before the registry architecture is built and anything is downloaded
        _check_adapter_args(early, dtype=dtype, device=device)
    art, adapter, model, replace = _prepare(source, model=model, framework=framework, registry=registry,
                                            config=config, num_classes=num_classes, sha256=sha256,
                                            strategy=strategy, hub=dict(cache=cache, offline=offline, token=token))
    art = with_key(art, key)
    if adapter is None:
        art = fetch_artifact(art, cache=cache, offline=offline, token=token, progress=progress)
        if _is_full_model(art):
            from .adapters import get_adapter

            loaded = get_adapter("tf").load_full(art.path)  # whole saved models are a Keras/TF artifact
            return (loaded, None) if return_report else loaded
        raise UsageError(f"{art.label}: a weights checkpoint needs a model: pass model=your_model, or "
                         "framework='torch' / 'tf' to build the registry entry's architecture")

    model_spec = family_model_spec(model, _spec_layout(art, layout)) or adapter.spec(model)
    rename = (*rename, *family_renames(model))
    plan = make_plan(adapter=adapter, model=model, spec=model_spec, reference=reference,
                     example_inputs=example_inputs, probe=_probe_for(art, replace, exclude, config), verify=verify,
                     label=art.label)

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
        raise UsageError(f"{art.label} is a whole saved model, not a weights file; load it without model=/"
                         "framework= to get the saved model itself")
    with _all_ranks(plan.collective, art.label), open_artifact(art) as reader:
        report = _report(canonical_tensors(reader, art, layout, rename), model_spec, art, model, exclude=exclude,
                         replace=replace, strict=strict)
        if optimizer is not None:
            if reader.format not in adapter.native_formats:
                raise UsageError("optimizer= restores optimizer state from a tf.train.Checkpoint into a Keras "
                                 f"model; {art.label} is a {reader.format} checkpoint for a {adapter.name} model")
            report = adapter.restore_native(model, art.path, optimizer=optimizer)
        else:
            review(plan, report, layout or art.layout or reader.layout, _flatten_order(reader))
            report.raise_if_incompatible(strict)
            _apply(plan, adapter, model, report, reader, dtype=dtype, device=device, model_spec=model_spec)
    model = adapter.place(model, device)
    _freeze(adapter, model, report, freeze, art.label)
    return (model, report) if return_report else model


def check(source: str | os.PathLike[str], *, model: Any = None, framework: str | None = None, strict: bool = True,
          registry: RegistryArg = None, exclude: Iterable[str] = (), rename: Sequence[Any] = (),
          key: str | None = None, layout: str | None = None, num_classes: int | None = None,
          config: Mapping[str, Any] | None = None, sha256: str | None = None, offline: bool | None = None,
          token: str | bool | None = None, progress: bool | None = None,
          cache_dir: str | os.PathLike[str] | None = None, reference: Any = None, example_inputs: Any = None,
          verify: Any = "auto") -> CompatReport:
    """Compare a checkpoint with a model without loading anything.

    For an uncached single-file safetensors on an ``hf://`` or ``https://`` source only the header is read
    (HTTP Range requests); other remote checkpoints are pulled into the cache first.

    Args:
        source, model, framework, strict, registry, exclude, rename, key, layout, num_classes, config, sha256,
        offline, token, progress, cache_dir, reference, example_inputs: as for :func:`load` (``source`` may be
            a live model).
        verify: ``"auto"`` verifies numerically when a reference exists (a live source or ``reference=``);
            ``True`` also runs the registry entry's probe (downloading the checkpoint if needed). The weights
            are copied for that and always restored: the model is left as it was.

    Returns:
        The CompatReport (``report.ok`` tells whether a strict load would succeed; ``warnings``, ``behaviour``
        and ``verification`` say what the numbers would be).
    """
    _check_args(dtype="model", verify=verify, freeze=None)
    live = live_model(source)
    if live is not None:
        _, report = _load_live(source, live, model=model, framework=framework, strict=strict, exclude=exclude,
                               rename=rename, dtype="model", device=None, freeze=None, return_report=True,
                               reference=reference, example_inputs=example_inputs, verify=verify, keep=False)
        return report
    cache = Cache(cache_dir)
    art, adapter, model, replace = _prepare(source, model=model, framework=framework, registry=registry,
                                            config=config, num_classes=num_classes, sha256=sha256,
                                            hub=dict(cache=cache, offline=offline, token=token))
    if adapter is None:
        raise UsageError(f"{art.label}: check needs a model to compare with: pass model= or framework=")
    art = with_key(art, key)
    model_spec = family_model_spec(model, _spec_layout(art, layout)) or adapter.spec(model)
    rename = (*rename, *family_renames(model))
    probe = _probe_for(art, replace, exclude, config) if verify is True else None
    plan = make_plan(adapter=adapter, model=model, spec=model_spec, reference=reference,
                     example_inputs=example_inputs, probe=probe, verify=verify, label=art.label)
    cheap = reference is None and not (plan.verify and probe is not None)
    report = _remote_report(art, model_spec, model, cache=cache, layout=layout, rename=rename, exclude=exclude,
                            replace=replace, strict=strict, offline=offline, token=token) if cheap else None
    if report is None:
        art = fetch_artifact(art, cache=cache, offline=offline, token=token, progress=progress)
        with open_artifact(art) as reader:
            report = _report(canonical_tensors(reader, art, layout, rename), model_spec, art, model, exclude=exclude,
                             replace=replace, strict=strict)
            review(plan, report, layout or art.layout or reader.layout, _flatten_order(reader))
            if report.ok and plan.verify:
                _trial_apply(plan, adapter, model, report, reader, model_spec)
    elif art.layout is not None or layout is not None:
        review(plan, report, layout or art.layout)  # attributes and traps from the header alone
    return report


def inspect(source: str | os.PathLike[str], *, registry: RegistryArg = None, key: str | None = None,
            offline: bool | None = None, token: str | bool | None = None, progress: bool | None = None,
            cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The tensors of a checkpoint (name → TensorInfo: shape, dtype, bytes), without reading tensor data.

    An uncached remote single-file safetensors is read with Range requests only.
    """
    cache = Cache(cache_dir)
    art = resolve_source(source, registry=registry, cache=cache, offline=offline, token=token)
    art = with_key(art, key)
    header = remote_safetensors_header(art, cache=cache, offline=offline, token=token)
    if header is not None:
        return dict(header.tensors)
    art = fetch_artifact(art, cache=cache, offline=offline, token=token, progress=progress)
    if _is_full_model(art):
        raise UsageError(f"{art.label} is a whole saved model; `inspect` reads weight checkpoints")
    with open_artifact(art) as reader:
        return dict(reader.tensors())


# --------------------------------------------------------------------- behaviour: live sources and verification


def _check_args(*, dtype: Any, verify: Any, freeze: Any) -> None:
    """Refuse bad argument values before anything is resolved or downloaded."""
    if not (verify is True or verify is False or verify == "auto"):
        raise UsageError(f"verify={verify!r}: use 'auto' (verify when a reference or probe exists), True or False")
    if isinstance(dtype, str) and dtype not in ("model", "checkpoint"):
        from .checkpoint import SAFETENSORS_DTYPES, canonical_dtype

        known = sorted({n for n, _ in SAFETENSORS_DTYPES.values()})
        if canonical_dtype(dtype) not in known:
            raise UsageError(f"dtype={dtype!r} is not a dtype hubload knows; use 'model', 'checkpoint' or one of "
                             f"{', '.join(known)}")
    if freeze is not None and not isinstance(freeze, str) and \
            not (isinstance(freeze, Sequence) and all(isinstance(g, str) for g in freeze)):
        raise UsageError(f"freeze={freeze!r}: use 'backbone' or a list of globs of canonical names")


def _check_adapter_args(adapter: Any, *, dtype: Any, device: Any) -> None:
    """Refuse options the target's adapter does not support, before any download."""
    policies = getattr(adapter, "dtype_policies", None)
    if policies is not None and (not isinstance(dtype, str) or dtype not in policies):
        raise UsageError(f"dtype={dtype!r} is not supported for {adapter.name} models (supported: "
                         f"{', '.join(map(repr, policies))}); build the model with the dtype you want")
    if device is not None and "device" not in getattr(adapter, "apply_options", ()):
        adapter.place(None, device)  # raises the adapter's own explanation
        raise UsageError(f"device= is not supported for {adapter.name} models")


def _probe_for(art: Artifact, replace: Iterable[str], exclude: Iterable[str],
               config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The entry's probe when the load reproduces the entry as published (no new head, no overrides)."""
    entry = art.entry
    probe = getattr(entry, "probe", None) if entry is not None else None
    if probe is None or tuple(replace) or tuple(exclude) or config:
        return None
    return probe


def _apply(plan: Any, adapter: Any, model: Any, report: CompatReport, reader: Any, *, dtype: Any, device: Any,
           model_spec: Mapping[str, Any], keep: bool = True) -> None:
    """``adapter.apply`` with the options it declares, verified (and rolled back) as the plan says."""
    offered = {"dtype_policy": dtype, "model_spec": model_spec, "device": device}
    accepted = getattr(adapter, "apply_options", frozenset({"dtype_policy"}))
    options = {k: v for k, v in offered.items() if k in accepted}
    apply_verified(plan, report, reader, lambda: adapter.apply(model, report, reader, **options), keep=keep)


def _trial_apply(plan: Any, adapter: Any, model: Any, report: CompatReport, reader: Any,
                 model_spec: Mapping[str, Any]) -> None:
    """Copy, verify and restore (for ``check``): the outcome lands in ``report.verification``."""
    from .errors import IncompatibleWeightsError

    try:
        _apply(plan, adapter, model, report, reader, dtype="model", device=None, model_spec=model_spec, keep=False)
    except IncompatibleWeightsError as exc:
        if exc.report is not report:
            raise


def _load_live(source: Any, src_adapter: Any, *, model: Any, framework: str | None, strict: bool,
               exclude: Iterable[str], rename: Sequence[Any], dtype: Any, device: Any,
               freeze: str | Sequence[str] | None, return_report: bool, reference: Any, example_inputs: Any,
               verify: Any, keep: bool = True) -> Any:
    """Load from a live model: its tensors are the checkpoint and the model itself is the reference."""
    label = f"<{type(source).__module__}.{type(source).__name__} model>"
    if reference is not None:
        raise UsageError(f"{label}: a live source model is its own reference; drop reference=")
    adapter = _adapter(model, framework)
    if adapter is None or model is None:
        raise UsageError(f"{label}: loading from a live model needs the target: pass model=your_model")
    if model is source:
        raise UsageError(f"{label}: the source and the target are the same model object")
    _check_adapter_args(adapter, dtype=dtype, device=device)
    from .layout import to_canonical

    reader, src_spec = live_reader(src_adapter, source)
    model_spec = adapter.spec(model)
    plan = make_plan(adapter=adapter, model=model, spec=model_spec, reference=source, example_inputs=example_inputs,
                     probe=None, verify=verify, label=label, ref_adapter=src_adapter, ref_spec=src_spec)
    ckpt = to_canonical(reader.tensors(), "torch", rename=tuple(rename))
    report = compat_check(ckpt, model_spec, exclude=tuple(exclude), strict=strict, source=label,
                          target=type(model).__name__)
    review(plan, report, src_adapter.native_layout)
    if not keep:  # check(): copy, verify and restore only when a load would be allowed
        if report.ok and plan.verify:
            _trial_apply(plan, adapter, model, report, reader, model_spec)
        return model, report
    report.raise_if_incompatible(strict)
    _apply(plan, adapter, model, report, reader, dtype=dtype, device=device, model_spec=model_spec)
    model = adapter.place(model, device)
    _freeze(adapter, model, report, freeze, label)
    return (model, report) if return_report else model
