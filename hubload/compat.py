"""Compatibility checker: does a checkpoint fit a model? Answered before any tensor is copied.

Both sides arrive in the canonical layout (see :mod:`hubload.layout`): the checkpoint as
``CanonicalTensor`` objects, the model as anything with ``.shape`` and ``.dtype``. :func:`check`
normalises keys (wrapper prefixes, one base-model prefix), pairs tensors and sorts every key into
exactly one bucket of a :class:`CompatReport`: matched, missing, unexpected, shape mismatch, ignored
(with the reason) or replaced. dtype differences are matched tensors that will be cast.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from hubload.checkpoint import canonical_dtype
from hubload.errors import IncompatibleWeightsError
from hubload.keys import align_prefixes, glob_match, ignorable_reason, strip_wrapper_prefixes
from hubload.layout import Transform

__all__ = ["CompatReport", "DtypeCast", "Ignored", "Match", "ShapeMismatch", "check"]


@dataclass(frozen=True)
class Match:
    """A model tensor and the checkpoint tensor that will fill it.

    Attributes:
        key: The model's key (as given to :func:`check`).
        checkpoint_key: The key in the checkpoint mapping given to :func:`check` (canonical name).
        source: The tensor's native name in the checkpoint file.
        shape: Canonical shape (equal on both sides).
        dtype_from: Checkpoint dtype.
        dtype_to: Model dtype (the checkpoint tensor is cast to it).
        rule: Layout rule that translated the checkpoint tensor, if any.
        transform: Checkpoint native -> canonical transform, if any.
    """

    key: str
    checkpoint_key: str
    source: str
    shape: tuple[int, ...]
    dtype_from: str
    dtype_to: str
    rule: str | None = None
    transform: Transform | None = None

    def __init__(self, key: str, checkpoint_key: str, source: str, shape: tuple[int, ...], dtype_from: str,
                 dtype_to: str, rule: str | None = None, transform: Transform | None = None) -> None:
        # Frozen, filled in one call (see hubload.checkpoint.TensorInfo.__init__).
        self.__dict__.update(key=key, checkpoint_key=checkpoint_key, source=source, shape=shape,
                             dtype_from=dtype_from, dtype_to=dtype_to, rule=rule, transform=transform)


@dataclass(frozen=True)
class ShapeMismatch:
    """Same name on both sides, different canonical shapes."""

    key: str
    checkpoint_key: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass(frozen=True)
class DtypeCast:
    """A matched tensor whose dtype differs; it is cast to the model's dtype."""

    key: str
    from_dtype: str
    to_dtype: str


@dataclass(frozen=True)
class Ignored:
    """A key deliberately left out, and why.

    Attributes:
        key: Model key (side "model") or checkpoint key (side "checkpoint").
        reason: Why ("excluded by 'head.*'", "non-persistent buffer ...").
        side: "model" or "checkpoint".
    """

    key: str
    reason: str
    side: str = "checkpoint"


def _shape(values: Iterable[Any]) -> tuple[int, ...]:
    """Shape tuple of ints."""
    return tuple(map(int, values))


@dataclass
class CompatReport:
    """Everything :func:`check` found, one bucket per key.

    ``ok`` is True when nothing is missing, unexpected or mis-shaped. Render with ``str(report)`` or
    :meth:`render`; :meth:`to_json` keeps every key.
    """

    source: str = ""
    target: str = ""
    matched: list[Match] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    dtype_casts: list[DtypeCast] = field(default_factory=list)
    unsafe_casts: list[DtypeCast] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    prefix_changes: list[str] = field(default_factory=list)
    strict: bool = True
    # Behaviour (see hubload.behaviour): layer differences from a reference, known traps, numeric verification.
    behaviour: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verification: Any = None

    @property
    def ok(self) -> bool:
        """No missing, unexpected, shape-mismatched or value-destroying-cast tensors, no behaviour difference
        and no failed verification."""
        return not (self.missing or self.unexpected or self.shape_mismatches or self.unsafe_casts
                    or self.behaviour or self._verification_failed)

    @property
    def _verification_failed(self) -> bool:
        """A verification ran and failed."""
        return self.verification is not None and not self.verification.passed

    # ------------------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form with every key (shapes as lists, transforms as dicts)."""
        def conv(obj: Any) -> Any:
            if isinstance(obj, tuple):
                return [conv(o) for o in obj]
            if isinstance(obj, list):
                return [conv(o) for o in obj]
            if isinstance(obj, dict):
                return {k: conv(v) for k, v in obj.items()}
            return obj

        d = {
            "source": self.source,
            "target": self.target,
            "ok": self.ok,
            "strict": self.strict,
            "counts": {
                "matched": len(self.matched), "missing": len(self.missing),
                "unexpected": len(self.unexpected), "shape_mismatches": len(self.shape_mismatches),
                "dtype_casts": len(self.dtype_casts), "unsafe_casts": len(self.unsafe_casts),
                "ignored": len(self.ignored),
                "replaced": len(self.replaced),
            },
            "prefix_changes": list(self.prefix_changes),
            "shape_mismatches": [asdict(m) for m in self.shape_mismatches],
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "dtype_casts": [asdict(c) for c in self.dtype_casts],
            "unsafe_casts": [asdict(c) for c in self.unsafe_casts],
            "ignored": [asdict(i) for i in self.ignored],
            "replaced": list(self.replaced),
            "matched": [{**asdict(m), "transform": m.transform.to_dict() if m.transform else None}
                        for m in self.matched],
            "behaviour": [asdict(b) for b in self.behaviour],
            "warnings": list(self.warnings),
            "verification": self.verification.to_dict() if self.verification is not None else None,
        }
        return conv(d)

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict` (``kwargs`` go to ``json.dumps``, e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompatReport:
        """Rebuild a report from :meth:`to_dict` output."""
        return cls(
            source=data.get("source", ""),
            target=data.get("target", ""),
            matched=[Match(**{**m, "shape": _shape(m["shape"]),
                              "transform": Transform.from_dict(m["transform"]) if m.get("transform") else None})
                     for m in data.get("matched", [])],
            missing=list(data.get("missing", [])),
            unexpected=list(data.get("unexpected", [])),
            shape_mismatches=[ShapeMismatch(s["key"], s["checkpoint_key"], _shape(s["checkpoint_shape"]),
                                            _shape(s["model_shape"])) for s in data.get("shape_mismatches", [])],
            dtype_casts=[DtypeCast(**c) for c in data.get("dtype_casts", [])],
            unsafe_casts=[DtypeCast(**c) for c in data.get("unsafe_casts", [])],
            ignored=[Ignored(**i) for i in data.get("ignored", [])],
            replaced=list(data.get("replaced", [])),
            prefix_changes=list(data.get("prefix_changes", [])),
            strict=bool(data.get("strict", True)),
            **_behaviour_from_dict(data),
        )

    # ---------------------------------------------------------------------------------- rendering

    def summary(self) -> str:
        """One line: status and counts."""
        problems = []
        for n, word in ((len(self.shape_mismatches), "shape mismatch"), (len(self.missing), "missing"),
                        (len(self.unexpected), "unexpected"), (len(self.unsafe_casts), "unsafe cast"),
                        (len(self.behaviour), "behaviour difference"),
                        (int(self._verification_failed), "failed verification")):
            if n:
                problems.append(f"{n} {word}{'es' if word.endswith('ch') and n != 1 else ''}")
        status = "OK" if self.ok else "INCOMPATIBLE (" + ", ".join(problems) + ")"
        rest = (f"{len(self.matched)} matched, {len(self.dtype_casts)} dtype casts, "
                f"{len(self.ignored)} ignored, {len(self.replaced)} replaced")
        label = f"{self.source or 'checkpoint'} -> {self.target or 'model'}"
        return f"{label}: {status}; {rest}"

    def render(self, limit: int = 20, *, problems_only: bool = False) -> str:
        """A readable table: problems first, with counts, up to ``limit`` keys per group.

        Args:
            limit: Keys listed per group (the JSON form has them all).
            problems_only: Leave out dtype casts, ignored and replaced groups.

        Returns:
            Multi-line text.
        """
        lines = [self.summary()]
        lines += [f"  key normalisation: {c}" for c in self.prefix_changes]

        def group(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None,
                  note: str = "") -> None:
            if not rows:
                return
            lines.append("")
            lines.append(f"{title} ({len(rows)}){': ' + note if note else ':'}")
            shown = rows[:limit]
            table = ([header] if header else []) + shown
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            for r in table:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if len(rows) > limit:
                lines.append(f"  ... and {len(rows) - limit} more (every key is in report.to_json())")

        group("shape mismatches", [(m.key, str(list(m.checkpoint_shape)), str(list(m.model_shape)))
                                   for m in self.shape_mismatches], ("key", "checkpoint", "model"))
        group("unsafe casts", [(c.key, f"{c.from_dtype} -> {c.to_dtype}") for c in self.unsafe_casts],
              ("key", "checkpoint -> model"), note="would destroy values (e.g. float -> int); refused")
        group("behaviour differences", [(b.layer, b.attribute, f"reference: {b.reference}", f"target: {b.target}")
                                        for b in self.behaviour],
              note="the layers compute different things; refused")
        if self.verification is not None:
            lines.append("")
            lines.append(self.verification.render())
        group("warnings", [(w,) for w in self.warnings])
        group("missing", [(k,) for k in self.missing], note="in the model, not in the checkpoint")
        group("unexpected", [(k,) for k in self.unexpected], note="in the checkpoint, not in the model")
        if not problems_only:
            pairs: dict[tuple[str, str], list[str]] = {}
            for c in self.dtype_casts:
                pairs.setdefault((c.from_dtype, c.to_dtype), []).append(c.key)
            group("dtype casts", [(f"{a} -> {b}", f"{len(keys)} tensor{'s' if len(keys) != 1 else ''}", ", ".join(keys[:3]) +
                                   (", ..." if len(keys) > 3 else "")) for (a, b), keys in pairs.items()])
            group("ignored", [(i.key, f"[{i.side}]", i.reason) for i in self.ignored])
            group("replaced", [(k,) for k in self.replaced], note="re-initialised, not loaded")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def raise_if_incompatible(self, strict: bool | None = None) -> None:
        """Raise when the report forbids loading.

        Strict: any missing, unexpected or shape problem raises. Non-strict: missing and unexpected
        tensors are allowed, but shape mismatches still raise (exclude them explicitly to skip them).

        Args:
            strict: Override the report's ``strict`` flag.

        Raises:
            IncompatibleWeightsError: Carries this report as ``.report``.
        """
        strict = self.strict if strict is None else strict
        if self.ok or (not strict and not self.shape_mismatches and not self.unsafe_casts and not self.behaviour
                       and not self._verification_failed):
            return
        if self.behaviour and not (self.missing or self.unexpected or self.shape_mismatches or self.unsafe_casts):
            hint = ("The model was left as it was. Build the target with the reference's settings for the layers "
                    "named above (or fix the reference), then load again.")
        elif strict:
            hint = ("Pass strict=False to load the matching tensors anyway, exclude=[...] to leave model "
                    "tensors alone, or replace=[...] for a new head.")
        else:
            hint = ("Shape mismatches are never skipped silently: exclude=[...] or replace=[...] "
                    "the tensors named above.")
        raise IncompatibleWeightsError(f"{self.render(problems_only=True)}\n{hint}", report=self)


def _behaviour_from_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """The behaviour fields of :meth:`CompatReport.from_dict`."""
    from hubload.behaviour import Difference, Verification

    ver = data.get("verification")
    return {"behaviour": [Difference(**b) for b in data.get("behaviour", [])],
            "warnings": list(data.get("warnings", [])),
            "verification": Verification.from_dict(ver) if ver else None}


# Casts that destroy values rather than round them: float -> int/bool, complex -> real, int -> bool.
_UNSAFE_KINDS = {("f", "i"), ("f", "b"), ("c", "f"), ("c", "i"), ("c", "b"), ("i", "b")}


def _dtype_kind(dtype: str) -> str:
    """'c' complex, 'b' bool, 'i' integer, 'f' floating."""
    if dtype.startswith("complex"):
        return "c"
    if dtype == "bool":
        return "b"
    if dtype.startswith(("int", "uint")):
        return "i"
    return "f"


_unsafe_memo: dict[tuple[str, str], bool] = {}  # (from, to) -> unsafe; dtype names are few


def _unsafe_cast(d_from: str, d_to: str) -> bool:
    """True if casting ``d_from`` to ``d_to`` destroys values (float -> int ...)."""
    key = (d_from, d_to)
    unsafe = _unsafe_memo.get(key)
    if unsafe is None:
        unsafe = _unsafe_memo[key] = (_dtype_kind(d_from), _dtype_kind(d_to)) in _UNSAFE_KINDS
    return unsafe


def _first_glob(name: str, globs: tuple[str, ...]) -> str | None:
    """The first glob matching ``name``."""
    for g in globs:
        if glob_match(name, g):
            return g
    return None


def check(checkpoint: Mapping[str, Any], model: Mapping[str, Any], *, exclude: Iterable[str] = (),
          ignore: Iterable[str] = (), replace: Iterable[str] = (), strict: bool = True, source: str = "",
          target: str = "", align: bool = True) -> CompatReport:
    """Pair checkpoint tensors with model tensors and report every difference.

    Keys are normalised first: ``module.``/``_orig_mod.`` wrapper prefixes are stripped on both sides,
    then one base-model prefix (``bert.``) is added to or stripped from checkpoint keys when that lines
    up noticeably more names (recorded in ``prefix_changes``).

    Args:
        checkpoint: Canonical name -> :class:`~hubload.layout.CanonicalTensor` (or anything with
            ``.shape`` and ``.dtype``; ``.source``/``.rule``/``.transform`` are used when present).
        model: Canonical name -> object with ``.shape`` and ``.dtype``.
        exclude: Globs on model names: those tensors are left untouched and reported as ignored
            (a checkpoint tensor of the same name too).
        ignore: Globs on checkpoint names the model does not use (e.g. ``cls.*``): reported as ignored.
        replace: Globs on model names of re-initialised heads: reported as replaced, never as missing
            or mismatched.
        strict: Stored on the report for :meth:`CompatReport.raise_if_incompatible`.
        source: Label of the checkpoint (model ID, file).
        target: Label of the model (class name).
        align: Try the base-model prefix alignment.

    Returns:
        The :class:`CompatReport` (this function never raises for incompatibility).
    """
    exclude, ignore, replace = tuple(exclude), tuple(ignore), tuple(replace)
    report = CompatReport(source=source, target=target, strict=strict)
    model = _choose_forms(checkpoint, model)
    checkpoint, model = _pair_structural(checkpoint, model)

    ck_norm, ck_changed = strip_wrapper_prefixes(checkpoint)
    if ck_changed:
        report.prefix_changes.append(f"stripped wrapper prefixes (module./_orig_mod.) from {ck_changed} "
                                     "checkpoint keys")
    md_norm, md_changed = strip_wrapper_prefixes(model)
    if md_changed:
        report.prefix_changes.append(f"stripped wrapper prefixes (module./_orig_mod.) from {md_changed} model keys")
    if align:
        alignment = align_prefixes(ck_norm, md_norm)
        if alignment.action:
            report.prefix_changes.append(alignment.describe())
        ck_keys = {aligned: ck_norm[orig] for aligned, orig in alignment.mapping.items()}
    else:
        ck_keys = dict(ck_norm)  # aligned name -> original checkpoint key

    consumed: set[str] = set()
    for name, model_key in md_norm.items():
        spec = model[model_key]
        ck_key = ck_keys.get(name)
        g = _first_glob(name, exclude) if exclude else None
        if g is not None:
            report.ignored.append(Ignored(model_key, f"excluded by {g!r}", "model"))
            if ck_key is not None:
                consumed.add(name)
                report.ignored.append(Ignored(ck_key, f"excluded by {g!r}", "checkpoint"))
            continue
        g = _first_glob(name, replace) if replace else None
        if g is not None:
            report.replaced.append(model_key)
            if ck_key is not None:
                consumed.add(name)
                report.ignored.append(Ignored(ck_key, f"model tensor is replaced ({g!r})", "checkpoint"))
            continue
        state = getattr(spec, "ignored", None)
        if state:  # saved state that is not a weight (a seed generator): never loaded, never missing
            report.ignored.append(Ignored(model_key, state, "model"))
            if ck_key is not None:
                consumed.add(name)
                report.ignored.append(Ignored(ck_key, f"model state, not a weight: {state}", "checkpoint"))
            continue
        if ck_key is None:
            reason = ignorable_reason(name, "model")
            if reason:
                report.ignored.append(Ignored(model_key, f"{reason}; not in the checkpoint", "model"))
            else:
                report.missing.append(model_key)
            continue
        consumed.add(name)
        tensor = checkpoint[ck_key]
        ck_shape, md_shape = _shape(tensor.shape), _shape(spec.shape)
        if ck_shape != md_shape:
            report.shape_mismatches.append(ShapeMismatch(model_key, ck_key, ck_shape, md_shape))
            continue
        d_from, d_to = canonical_dtype(tensor.dtype), canonical_dtype(spec.dtype)
        if _unsafe_cast(d_from, d_to):
            report.unsafe_casts.append(DtypeCast(model_key, d_from, d_to))
            continue
        report.matched.append(Match(model_key, ck_key, getattr(tensor, "source", ck_key), md_shape, d_from, d_to,
                                    getattr(tensor, "rule", None), getattr(tensor, "transform", None)))
        if d_from != d_to:
            report.dtype_casts.append(DtypeCast(model_key, d_from, d_to))

    for name, ck_key in ck_keys.items():
        if name in consumed:
            continue
        g = _first_glob(name, ignore) or (_first_glob(ck_key, ignore) if ck_key != name else None)
        if g is not None:
            report.ignored.append(Ignored(ck_key, f"ignored by {g!r}", "checkpoint"))
            continue
        g = _first_glob(name, exclude)
        if g is not None:
            report.ignored.append(Ignored(ck_key, f"excluded by {g!r}", "checkpoint"))
            continue
        reason = ignorable_reason(name, "checkpoint")
        if reason:
            report.ignored.append(Ignored(ck_key, f"{reason}; the model has no such tensor", "checkpoint"))
        else:
            report.unexpected.append(ck_key)
    return report


# --------------------------------------------------------------------------------- pairing groups


def _choose_forms(checkpoint: Mapping[str, Any], model: Mapping[str, Any]) -> Mapping[str, Any]:
    """Swap model tensors for the alternative form the checkpoint uses (a packed ``in_proj_weight``).

    A model tensor may carry ``.alternative`` (``replaces``: its group's names, ``tensors``: the other form's
    specs). The other form is taken when the checkpoint has every one of its names and none of the names it
    replaces, so a checkpoint with either form pairs one to one.
    """
    alts = {id(a): a for a in (getattr(t, "alternative", None) for t in model.values()) if a is not None}
    if not alts:
        return model
    out = dict(model)
    for alt in alts.values():
        if all(n in checkpoint for n in alt.tensors) and not any(n in checkpoint for n in alt.replaces):
            for n in alt.replaces:
                out.pop(n, None)
            out.update(alt.tensors)
    return out


def _native_shape(tensor: Any) -> tuple[int, ...]:
    """A checkpoint tensor's shape as stored (before its native -> canonical transform)."""
    t = getattr(tensor, "transform", None)
    shape = _shape(tensor.shape)
    return t.inverse().out_shape(shape) if t is not None else shape


def _pair_structural(checkpoint: Mapping[str, Any], model: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """Re-key checkpoint tensors stored at a model tensor's ``structural`` path to that model tensor's name.

    A Keras ``.weights.h5`` names a variable by where the model's structure stores it
    (``layers/dense_1/vars/0``), which is exact even when the file alone cannot tell the canonical name (a
    custom layer, an explicitly named sublayer of unknown class). Only tensors whose canonical names found no
    partner are re-keyed, and only when their stored shape equals the variable's; the transform becomes the
    model's own Keras -> canonical one, so the value lands unchanged.
    """
    by_path = {t.structural: name for name, t in model.items() if getattr(t, "structural", None)}
    if not by_path:
        return checkpoint, model
    claimed: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, tensor in checkpoint.items():
        target = by_path.get(getattr(tensor, "source", None))
        if target is None or target in claimed:
            rest[key] = tensor
            continue
        spec = model[target]
        to_keras = getattr(spec, "transform", None)
        keras_shape = to_keras.out_shape(_shape(spec.shape)) if to_keras is not None else _shape(spec.shape)
        try:
            native = _native_shape(tensor)
        except ValueError:
            native = None
        if native != keras_shape:  # the checker reports the shape mismatch under the canonical name
            rest[key] = tensor
            continue
        fwd = to_keras.inverse() if to_keras is not None else None
        claimed[target] = _Rekeyed(target, tensor.source, _shape(spec.shape), canonical_dtype(tensor.dtype), fwd,
                                   "structural")
    if not claimed:
        return checkpoint, model
    out = dict(claimed)
    for key, tensor in rest.items():
        out[key if key not in out else getattr(tensor, "source", key)] = tensor
    return out, model


@dataclass(frozen=True)
class _Rekeyed:
    """A checkpoint tensor paired by its storage path (same fields as ``layout.CanonicalTensor``)."""

    canonical: str
    source: str
    shape: tuple[int, ...]
    dtype: str
    transform: Transform | None = None
    rule: str | None = None
