"""Numeric verification: the outcome (:class:`Verification`), dtype-aware tolerances, and the first layer where
two recorded runs of models holding the same weights part ways (:func:`first_divergent`).

numpy is imported lazily. Re-exported by :mod:`hubload.behaviour`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hubload.behaviour import Event
from hubload.checkpoint import canonical_dtype

__all__ = ["Verification", "first_divergent", "max_abs_diff", "tolerance"]

log = logging.getLogger("hubload")


@dataclass(frozen=True)
class Verification:
    """The outcome of numeric verification after a copy.

    Attributes:
        passed: The target's outputs agreed with the reference (or the probe digest).
        max_abs_diff: Largest absolute difference of the outputs.
        tolerance: The tolerance they were compared with (dtype-aware, scaled by the output's magnitude).
        first_divergent: The first layer whose output diverges (compared layer by layer), or None.
        against: What was compared with: ``reference`` (a live model) or ``probe`` (the registry's digest).
        detail: One line about how the layers were compared, or why verification did not run.
    """

    passed: bool
    max_abs_diff: float
    tolerance: float
    first_divergent: str | None = None
    against: str = "reference"
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verification:
        """Inverse of :meth:`to_dict`."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def render(self) -> str:
        """One line."""
        status = "PASSED" if self.passed else "FAILED"
        where = f"; first divergent layer: {self.first_divergent}" if self.first_divergent else ""
        extra = f" ({self.detail})" if self.detail else ""
        return (f"verification against the {self.against}: {status}, max |diff| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}){where}{extra}")


_BASE_TOL = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def tolerance(dtype: str, scale: float = 1.0) -> float:
    """Absolute tolerance for outputs of ``dtype`` whose magnitude is about ``scale``.

    float32 allows 1e-5 per unit of magnitude (kernels of two frameworks differ by summation order), half
    precision 2e-3 and bfloat16 2e-2.
    """
    return _BASE_TOL.get(canonical_dtype(dtype), 1e-5) * max(1.0, float(scale))


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest |a - b|, with channels-last/first and flattened layouts lined up; inf when shapes cannot be."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        if a.ndim >= 3 and np.moveaxis(b, -1, 1).shape == a.shape:
            b = np.moveaxis(b, -1, 1)
        elif a.ndim >= 3 and np.moveaxis(b, 1, -1).shape == a.shape:
            b = np.moveaxis(b, 1, -1)
        else:
            return math.inf
    if a.size == 0:
        return 0.0
    d = np.abs(a - b)
    return math.inf if not np.isfinite(d).all() else float(d.max())


def _canonical_input(ev: Event) -> Any:
    """An event's input in the canonical (channels-first) layout."""
    import numpy as np

    x = np.asarray(ev.inp)
    return np.moveaxis(x, -1, 1) if ev.channels_last and x.ndim >= 3 else x


def _agree(a: Any, b: Any, tol: float) -> bool:
    """Two layer inputs agree (up to a permutation of each sample's values, which a flatten-order fix makes)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape == b.shape and max_abs_diff(a, b) <= tol:
        return True
    if a.size != b.size or a.shape[:1] != b.shape[:1]:
        return False
    sa = np.sort(a.reshape(a.shape[0], -1), axis=1)
    sb = np.sort(b.reshape(b.shape[0], -1), axis=1)
    return float(np.abs(sa - sb).max()) <= tol


def first_divergent(ref_events: Sequence[Event], tgt_events: Sequence[Event], pairs: Mapping[str, str],
                    dtype: str = "float32") -> tuple[str | None, str]:
    """The first layer (in the target's call order) after which the two runs part ways.

    Layer *inputs* are compared (a Keras Dense with ``activation=`` and a torch Linear followed by the same
    function differ at their outputs only), so the layer named is the one whose output, as seen by the next
    layer, differs: the divergence happened in that layer or between it and the next one.

    Args:
        ref_events: The reference's recorded call.
        tgt_events: The target's recorded call (same inputs, converted).
        pairs: Target prefix -> reference prefix.
        dtype: The outputs' dtype (for the tolerance).

    Returns:
        ``(layer or None, detail)``.
    """
    ref_in: dict[str, Any] = {}
    for ev in ref_events:
        if ev.key is not None and ev.key not in ref_in:
            ref_in[ev.key] = _canonical_input(ev)
    previous: str | None = None
    seen: set[str] = set()
    for ev in tgt_events:
        if ev.key is None or ev.key in seen or ev.key not in pairs or pairs[ev.key] not in ref_in:
            continue
        seen.add(ev.key)
        mine = _canonical_input(ev)
        theirs = ref_in[pairs[ev.key]]
        import numpy as np

        scale = float(np.abs(np.asarray(theirs, dtype=np.float64)).max()) if np.size(theirs) else 1.0
        if not _agree(theirs, mine, tolerance(dtype, scale)):
            if previous is None:
                return ev.key, f"the input of {ev.key} already differs (input layout or an earlier layer " \
                               "without weights)"
            return previous, f"the output of {previous}, as {ev.key} receives it, differs " \
                             f"(max |diff| {max_abs_diff(theirs, mine):.3g})"
        previous = ev.key
    if previous is None:
        return None, "no layer pairs were recorded"
    return previous, f"every layer input agrees up to {previous}; the difference is in {previous} or after it"
