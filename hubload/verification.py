"""The behaviour steps of a load: compare with a reference before the copy, verify the numbers after it.

    plan (reference? probe? inputs?) ─► review: describe both models, compare layers, traps, flatten fix
        ─► report.raise_if_incompatible ─► snapshot ─► apply ─► verify ─► (restore + raise) or keep

A *reference* is a live model (a source model, or ``reference=``) whose weights are the checkpoint's. A
*probe* is a registry entry's seeded input and expected output digest (see :mod:`hubload.probe`). Probe
inputs come from ``example_inputs=`` (in the target's convention), else from the shapes a model was built or
called with, else from the entry's probe. Everything here goes through the adapter Protocol only.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hubload.behaviour import (
    LayerDesc,
    Verification,
    compare,
    first_divergent,
    flatten_fixes,
    max_abs_diff,
    tolerance,
    trap_warnings,
)
from hubload.checkpoint import TensorInfo, canonical_dtype
from hubload.errors import HubloadError, IncompatibleWeightsError, UsageError

__all__ = ["VERIFY_CHOICES", "LiveReader", "Plan", "apply_verified", "live_model", "live_reader", "make_plan",
           "review", "verify_loaded"]

log = logging.getLogger("hubload")

VERIFY_CHOICES = ("auto", True, False)

_ORDER = {"torch": "channels_first", "keras": "channels_last"}


class LiveReader:
    """A live model's tensors as a checkpoint reader (canonical layout: ``layout = "torch"``).

    Args:
        label: How messages name the model.
        spec: The model's canonical spec (``adapter.spec(model)``).
        read: ``ModelTensor`` -> its value in the canonical layout (``adapter.read_tensor``).
    """

    format = "live-model"
    layout = "torch"

    def __init__(self, label: str, spec: Mapping[str, Any], read: Callable[[Any], Any]) -> None:
        self.path = label
        self._spec = dict(spec)
        self._read = read

    def tensors(self) -> dict[str, TensorInfo]:
        """Canonical name -> TensorInfo (no data read)."""
        out = {}
        for name, t in self._spec.items():
            n = math.prod(t.shape) if t.shape else 1
            out[name] = TensorInfo(name, tuple(t.shape), canonical_dtype(t.dtype), n * 4)
        return out

    def get(self, name: str) -> Any:
        """The tensor's current value in the canonical layout."""
        return self._read(self._spec[name])

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LiveReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def live_model(source: Any) -> Any:
    """The adapter of ``source`` when it is a live model (not a path/ID/URL), else None.

    Raises:
        UsageError: ``source`` is neither a string/path nor a model a known adapter owns.
    """
    if isinstance(source, (str, os.PathLike)):
        return None
    from hubload.adapters import get_adapter

    try:
        return get_adapter(source)
    except HubloadError as exc:
        raise UsageError(f"source must be a model ID, URL, path, or a live torch/Keras model; got a "
                         f"{type(source).__module__}.{type(source).__name__} ({exc})") from None


def live_reader(adapter: Any, model: Any) -> tuple[LiveReader, dict[str, Any]]:
    """A live model as a checkpoint: (reader in the canonical layout, its spec)."""
    spec = adapter.spec(model)
    return LiveReader(f"<{type(model).__name__} model>", spec, adapter.read_tensor), spec


def _dtype_of(spec: Mapping[str, Any]) -> str:
    """The least precise floating dtype among a spec's tensors (it sets the tolerance)."""
    rank = {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}
    best = "float32"
    seen = [str(t.dtype) for t in spec.values() if str(t.dtype) in rank]
    if seen:
        best = max(seen, key=lambda d: rank[d])
    return best


@dataclass
class Plan:
    """What a load can be checked against, decided before anything is downloaded.

    Attributes:
        adapter, model, spec: The target.
        ref_adapter, reference, ref_spec: The reference (a live model), or None.
        probe: The registry entry's probe, or None.
        inputs: Probe inputs in the canonical convention, or None; read them with :func:`plan_inputs`.
        verify: Run numeric verification after the copy.
        collective: The load is collective across torch.distributed ranks (``adapter.collective_load``).
        infer: ``inputs`` are still to be inferred from the model (``adapter.infer_inputs``) when first needed.
        label: How messages name the source.
        descs, ref_descs: Descriptors, filled by :func:`review`.
        pairs: Target layer prefix -> reference layer prefix (from the report's matched tensors).
    """

    adapter: Any
    model: Any
    spec: Mapping[str, Any]
    ref_adapter: Any = None
    reference: Any = None
    ref_spec: Mapping[str, Any] | None = None
    probe: Mapping[str, Any] | None = None
    inputs: list[Any] | None = None
    verify: bool = False
    label: str = ""
    collective: bool = False
    infer: bool = False
    descs: dict[str, LayerDesc] = field(default_factory=dict)
    ref_descs: dict[str, LayerDesc] = field(default_factory=dict)
    pairs: dict[str, str] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        """The dtype the tolerance is set by."""
        dts = [_dtype_of(self.spec)] + ([_dtype_of(self.ref_spec)] if self.ref_spec else [])
        rank = {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}
        return max(dts, key=lambda d: rank.get(d, 1))


def make_plan(*, adapter: Any, model: Any, spec: Mapping[str, Any], reference: Any, example_inputs: Any,
              probe: Mapping[str, Any] | None, verify: Any, label: str, ref_adapter: Any = None,
              ref_spec: Mapping[str, Any] | None = None) -> Plan:
    """Decide how the load is checked (reference, probe, inputs), before any download.

    Raises:
        UsageError: ``verify=True`` with nothing to verify against, or inputs that cannot be used.
    """
    if reference is not None and ref_adapter is None:
        ref_adapter = live_model(reference)
        if ref_adapter is None:
            raise UsageError(f"reference= must be a live torch or Keras model (the one that produced {label}); "
                             f"got {type(reference).__name__}")
        ref_spec = ref_adapter.spec(reference)
    plan = Plan(adapter, model, spec, ref_adapter, reference, ref_spec, probe, None, False, label,
                collective=adapter.collective_load(model))
    if plan.collective:
        # A sharded model's forward pass is a collective that every rank must run together; hubload checks the
        # global names, shapes and dtypes and copies each rank's exact slice, but does not run the model.
        if verify is True or reference is not None:
            raise UsageError(f"{label}: numeric verification (verify=True or reference=) is not supported for a "
                             "model sharded across torch.distributed ranks (FSDP2/DTensor); verify the dense model "
                             "before sharding it, or pass verify='auto'")
        log.info("%s: a sharded model; numeric verification skipped (names, shapes and dtypes are checked)", label)
        return plan
    if example_inputs is not None:
        given = list(example_inputs) if isinstance(example_inputs, (list, tuple)) else [example_inputs]
        plan.inputs = adapter.to_canonical_inputs(model, given)
    elif reference is not None:
        plan.inputs = _shared_inputs(adapter, model, ref_adapter, reference)
    else:
        # Without a reference the inputs only serve review's flatten check, and inferring them may run the model
        # (a conv net is tried on a few sizes): leave it until that check asks (plan_inputs).
        plan.infer = True
    can_verify = (reference is not None and plan.inputs is not None) or probe is not None
    if verify is True and not can_verify:
        why = "no input shape is known (pass example_inputs=)" if reference is not None else \
            "there is no reference model (reference= or a live source) and the registry entry has no probe"
        raise UsageError(f"{label}: verify=True but {why}; pass verify='auto' to load without verification")
    plan.verify = verify is not False and can_verify
    return plan


def plan_inputs(plan: Plan) -> list[Any] | None:
    """The plan's canonical probe inputs, inferred from the target on the first call when make_plan deferred it."""
    if plan.infer:
        plan.infer = False
        native = plan.adapter.infer_inputs(plan.model)
        if native is not None:
            plan.inputs = plan.adapter.to_canonical_inputs(plan.model, native)
    return plan.inputs


def _runs(adapter: Any, model: Any, inputs: list[Any]) -> bool:
    """True if the model runs on these canonical inputs."""
    try:
        adapter.run(model, adapter.to_native_inputs(model, inputs))
    except Exception:  # noqa: BLE001 - any failure means these inputs do not fit
        return False
    return True


def _shared_inputs(adapter: Any, model: Any, ref_adapter: Any, reference: Any) -> list[Any] | None:
    """Canonical probe inputs both models run on: inferred from the target, else from the reference."""
    for a, m in ((adapter, model), (ref_adapter, reference)):
        try:
            native = a.infer_inputs(m)
        except Exception:  # noqa: BLE001 - an unusual model: try the other side
            native = None
        if native is None:
            continue
        canonical = a.to_canonical_inputs(m, native)
        other = (ref_adapter, reference) if m is model else (adapter, model)
        if _runs(*other, canonical):
            return canonical
    return None


def _native(adapter: Any, model: Any, inputs: Sequence[Any]) -> list[Any]:
    """Canonical inputs in a model's convention."""
    return adapter.to_native_inputs(model, inputs)


def _describe(adapter: Any, model: Any, spec: Mapping[str, Any], inputs: list[Any] | None) -> dict[str, LayerDesc]:
    """Descriptors with a recorded call when inputs exist; attributes only if the model cannot run them."""
    if inputs is not None:
        try:
            return adapter.describe(model, spec, _native(adapter, model, inputs))
        except Exception as exc:  # noqa: BLE001 - a model that cannot run the probe is described statically
            log.info("%s: could not record a call on the probe inputs (%s: %s); comparing attributes only",
                     type(model).__name__, type(exc).__name__, exc)
    return adapter.describe(model, spec, None)


def _pairs(report: Any) -> list[tuple[str, str]]:
    """(target prefix, reference prefix) for every matched tensor."""
    return [(m.key.rpartition(".")[0], m.checkpoint_key.rpartition(".")[0]) for m in report.matched]


def review(plan: Plan, report: Any, checkpoint_layout: str | None, flatten_order: str | None = None) -> None:
    """Compare behaviour before the copy (in place on ``report``): differences, warnings, the flatten fix.

    Args:
        plan: From :func:`make_plan`.
        report: The compat report (names/shapes checked).
        checkpoint_layout: The checkpoint's tensor convention (``torch``/``keras``); for a live source, its
            framework's.
        flatten_order: The order the checkpoint's flattened feature maps are in when the file says so
            (``channels_first``/``channels_last``, as ``hubload convert`` records it); else the layout's.
    """
    cross = checkpoint_layout is not None and checkpoint_layout != plan.adapter.native_layout
    if plan.reference is None and not cross:
        return  # same framework, no reference: nothing here can differ by convention
    if plan.reference is None:
        # Without a reference the recorded call only serves the flatten check, which needs a feature map.
        plan.descs = plan.adapter.describe(plan.model, plan.spec, None)
        if any(d.kind.startswith("conv") for d in plan.descs.values()):
            plan.descs = _describe(plan.adapter, plan.model, plan.spec, plan_inputs(plan))
    else:
        plan.descs = _describe(plan.adapter, plan.model, plan.spec, plan.inputs)
    pairs = _pairs(report)
    if plan.reference is not None:
        plan.ref_descs = _describe(plan.ref_adapter, plan.reference, plan.ref_spec or {}, plan.inputs)
        report.behaviour.extend(compare(plan.ref_descs, plan.descs, pairs))
        by_target = dict(pairs)

        def source_order(prefix: str) -> str | None:
            ref = plan.ref_descs.get(by_target.get(prefix, ""))
            if ref is not None and "flatten_of" in ref.attrs:
                return ref.attrs["flatten_of"][1]
            return None
    else:
        report.warnings.extend(trap_warnings(plan.descs, checkpoint_layout))

        def source_order(prefix: str) -> str | None:
            return flatten_order or _ORDER.get(checkpoint_layout or "")
    report.warnings.extend(flatten_fixes(report, plan.descs, source_order))


def verify_loaded(plan: Plan, values: Any = None) -> Verification:
    """Run the target (on ``values``, the checkpoint's tensors, when given) and compare its outputs with the
    reference's (or the probe digest)."""
    from hubload.probe import check_digest, make_input

    if plan.reference is not None and plan.inputs is not None:
        ref_out, _ = plan.ref_adapter.run(plan.reference, _native(plan.ref_adapter, plan.reference, plan.inputs))
        out, _ = plan.adapter.run(plan.model, _native(plan.adapter, plan.model, plan.inputs), values=values)
        if not ref_out or not out:
            return Verification(False, float("inf"), 0.0, None, "reference", "a model returned no tensor")
        import numpy as np

        scale = max(float(np.abs(np.asarray(r, dtype=np.float64)).max()) if np.size(r) else 0.0 for r in ref_out)
        tol = tolerance(plan.dtype, scale)
        if len(ref_out) != len(out):
            diff = float("inf")
        else:
            diff = max(max_abs_diff(r, t) for r, t in zip(ref_out, out))
        if diff <= tol:
            return Verification(True, diff, tol, None, "reference")
        layer, detail = _locate(plan, values)
        return Verification(False, diff, tol, layer, "reference", detail)
    probe = plan.probe or {}
    inputs = [make_input(probe["input"])]
    out, _ = plan.adapter.run(plan.model, _native(plan.adapter, plan.model, inputs), values=values)
    if not out:
        return Verification(False, float("inf"), 0.0, None, "probe", "the model returned no tensor")
    passed, diff, tol, detail = check_digest(probe["output"], out[0], plan.dtype, probe.get("tolerance"))
    if passed is None:
        return Verification(False, diff, tol, None, "probe", f"the probe does not apply: {detail}")
    return Verification(bool(passed), diff, tol, None if passed else "(model output)", "probe", detail)


def _locate(plan: Plan, values: Any) -> tuple[str | None, str]:
    """The first divergent layer, from recorded calls of both models on the same inputs."""
    if plan.inputs is None:
        return None, "no inputs to compare the layers on"
    try:
        _, ref_events = plan.ref_adapter.run(plan.reference, _native(plan.ref_adapter, plan.reference, plan.inputs),
                                             spec=plan.ref_spec, record=True)
        _, events = plan.adapter.run(plan.model, _native(plan.adapter, plan.model, plan.inputs),
                                     spec=plan.spec, record=True, values=values)
    except Exception as exc:  # noqa: BLE001 - locating is best effort; the failure itself stands
        return None, f"layers not compared ({type(exc).__name__}: {exc})"
    return first_divergent(ref_events, events, plan.pairs, plan.dtype)


def apply_verified(plan: Plan, report: Any, reader: Any, do_apply: Callable[[], None], *, keep: bool = True) -> None:
    """Verify the checkpoint's numbers in the target, then copy them.

    The target runs on the checkpoint's tensors *before* the copy (``adapter.checkpoint_values`` +
    ``adapter.run(values=...)``: torch ``functional_call``, Keras ``stateless_call``), so a failed verification
    leaves the model exactly as it was and costs no snapshot. An adapter without ``checkpoint_values``, or
    whose ``checkpoint_values`` returns None (its rollback costs less than a run on separate values: Keras
    models up to 128 MiB), is verified after the copy and rolled back with ``snapshot``/``restore``.

    Args:
        plan: From :func:`make_plan` (``verify`` decides whether anything beyond ``do_apply`` runs).
        report: The compat report; ``report.verification`` is set.
        reader: The checkpoint reader the report was computed from.
        do_apply: Copies the report's matched tensors (``adapter.apply``).
        keep: Copy after a passed verification (False: only verify, as ``check`` does).

    Raises:
        IncompatibleWeightsError: The verification failed (nothing was copied); names the first divergent
            layer when a reference exists.
    """
    if not plan.verify:
        if keep:
            do_apply()
        return
    for t_prefix, r_prefix in _pairs(report):
        plan.pairs.setdefault(t_prefix, r_prefix)
    values_of = getattr(plan.adapter, "checkpoint_values", None)
    values = values_of(plan.model, report, reader, plan.spec) if values_of is not None else None
    if values is not None:
        result = verify_loaded(plan, values)
        report.verification = result
        if not result.passed:
            raise _failed(plan, report, result)
        if keep:
            do_apply()
        return
    snap = plan.adapter.snapshot(plan.model, [m.key for m in report.matched], plan.spec)
    do_apply()
    try:
        result = verify_loaded(plan)
    except Exception:
        plan.adapter.restore(plan.model, snap)
        raise
    report.verification = result
    if not result.passed or not keep:
        plan.adapter.restore(plan.model, snap)
    elif callable(getattr(snap, "close", None)):
        snap.close()  # kept: the old values are no longer needed
    if not result.passed:
        raise _failed(plan, report, result)


def _failed(plan: Plan, report: Any, result: Verification) -> IncompatibleWeightsError:
    """The refusal after a failed verification."""
    where = f"; first divergent layer: {result.first_divergent}" if result.first_divergent else ""
    return IncompatibleWeightsError(
        f"{plan.label} -> {type(plan.model).__name__}: with the checkpoint's weights, the model's outputs differ "
        f"from the {result.against}'s (max |diff| {result.max_abs_diff:.3g} > tolerance {result.tolerance:.3g})"
        f"{where}{' (' + result.detail + ')' if result.detail else ''}. Nothing was copied: the model is as it "
        "was. Compare the layers named above with the reference, or pass verify=False to skip this check.",
        report=report)
