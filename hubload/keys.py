"""Key matching: lining up checkpoint names with model names before tensors are paired.

:func:`hubload.compat.check` uses these helpers on canonical names (see :mod:`hubload.layout`):
:func:`strip_wrapper_prefixes` removes the ``module.`` / ``_orig_mod.`` prefixes that DataParallel,
DDP and ``torch.compile`` add, :func:`align_prefixes` adds or strips one base-model prefix
(``bert.``) when that lines up noticeably more names, and :func:`ignorable_reason` says which unpaired
names are known buffers (:data:`NON_PERSISTENT_BUFFERS`) rather than real problems.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable

__all__ = [
    "NON_PERSISTENT_BUFFERS",
    "WRAPPER_PREFIXES",
    "PrefixAlignment",
    "align_prefixes",
    "ignorable_reason",
    "strip_wrapper_prefixes",
]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers


# -------------------------------------------------------------------------------- key normalisation


def strip_wrapper_prefixes(names: Iterable[str]) -> tuple[dict[str, str], int]:
    """Strip leading ``module.`` / ``_orig_mod.`` wrapper prefixes (DataParallel, torch.compile).

    Args:
        names: Names to normalise.

    Returns:
        ``(mapping stripped -> original, number of names changed)``. A name whose stripped form would
        collide with another keeps its original spelling.
    """
    out: dict[str, str] = {}
    changed = 0
    names = list(names)
    plain = set(names)
    for n in names:
        s = n
        while s.startswith(WRAPPER_PREFIXES):
            s = s.split(".", 1)[1]
        if s != n and (s in plain or s in out):
            s = n  # keep both apart rather than merge two tensors
        changed += s != n
        out[s] = n
    return out, changed


@dataclass(frozen=True)
class PrefixAlignment:
    """Result of :func:`align_prefixes`.

    Attributes:
        mapping: Aligned checkpoint name -> original checkpoint name.
        action: "add", "strip" or None (nothing changed).
        prefix: The prefix added or stripped ("bert.").
        count: Number of names changed.
    """

    mapping: dict[str, str]
    action: str | None = None
    prefix: str = ""
    count: int = 0

    def describe(self) -> str:
        """One line for reports ("stripped 'bert.' from 199 checkpoint keys")."""
        if self.action is None:
            return ""
        verb = "added" if self.action == "add" else "stripped"
        prep = "to" if self.action == "add" else "from"
        return f"{verb} {self.prefix!r} {prep} {self.count} checkpoint keys"


def _prefix_votes(longer: Iterable[str], shorter: set[str], limit: int = 4) -> list[str]:
    """Prefixes (ending in a dot) that turn names of ``longer`` into names of ``shorter``, most votes first.

    Found from the names themselves, not by splitting at the first dot: a Keras layer name may hold dots
    (``mobilenetv2_1.00_224.Conv1.weight`` sits under the prefix ``mobilenetv2_1.00_224.``), and a base model may
    sit two levels down (``model.backbone.``).
    """
    counts: dict[str, int] = {}
    for n in longer:
        if n in shorter:
            continue
        i = n.find(".")
        while i != -1:
            if n[i + 1:] in shorter:
                counts[n[: i + 1]] = counts.get(n[: i + 1], 0) + 1
            i = n.find(".", i + 1)
    return [p for p, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]


def align_prefixes(ckpt_names: Iterable[str], model_names: Iterable[str]) -> PrefixAlignment:
    """Add or strip one base-model prefix (``bert.``) on checkpoint names when that lines names up.

    A candidate prefix is one that turns many checkpoint names into model names when stripped, or model names
    into checkpoint names (then it is added); it may span several segments or hold dots of a layer's name
    (``mobilenetv2_1.00_224.``). It is applied only to names that do not already match the model, and accepted only
    if the number of matching names grows by at least max(1, 5% of the smaller side).

    Args:
        ckpt_names: Canonical checkpoint names.
        model_names: Canonical model names.

    Returns:
        The :class:`PrefixAlignment` (identity mapping when nothing helps).
    """
    ckpt = list(ckpt_names)
    model = set(model_names)
    base = sum(n in model for n in ckpt)
    if base == len(ckpt):  # every name already matches: no candidate can gain anything
        return PrefixAlignment({n: n for n in ckpt})
    best: tuple[int, str, str, dict[str, str], int] | None = None
    candidates = ([("strip", p) for p in _prefix_votes(ckpt, model)]
                  + [("add", p) for p in _prefix_votes(model, set(ckpt))])
    for action, prefix in candidates:
        mapping: dict[str, str] = {}
        changed = 0
        for n in ckpt:
            new = n
            if n not in model:
                if action == "strip" and n.startswith(prefix):
                    new = n[len(prefix):]
                elif action == "add" and not n.startswith(prefix):
                    new = prefix + n
            if new in mapping:  # collision: refuse this candidate
                break
            changed += new != n
            mapping[new] = n
        else:
            score = sum(n in model for n in mapping)
            if best is None or score > best[0]:
                best = (score, action, prefix, mapping, changed)
    needed = max(1, math.ceil(0.05 * min(len(ckpt), len(model)))) if ckpt and model else 1
    if best is not None and best[0] - base >= needed:
        score, action, prefix, mapping, changed = best
        return PrefixAlignment(mapping, action, prefix, changed)
    return PrefixAlignment({n: n for n in ckpt})


# Known buffers that checkpoints may or may not carry. (glob, side, reason); side is where an
# *unpaired* name is forgiven: "checkpoint" (present only there), "model", or "both".
NON_PERSISTENT_BUFFERS: tuple[tuple[str, str, str], ...] = (
    ("*position_ids", "both", "non-persistent buffer (position ids are recomputed by the model)"),
    ("*num_batches_tracked", "both", "BatchNorm step counter (only used with momentum=None)"),
    ("*.attn.bias", "checkpoint", "causal-mask buffer saved by older checkpoints"),
    ("*.attn.masked_bias", "checkpoint", "causal-mask buffer saved by older checkpoints"),
    ("*rotary_emb.inv_freq", "checkpoint", "non-persistent rotary-embedding buffer"),
    # Keras' save_weights writes a compiled model's optimizer (top-level ``optimizer/vars/N``: iterations,
    # learning rate, slots) beside the layers; keras-hub task models compile themselves when built.
    ("optimizer.*", "checkpoint", ("optimizer state saved with the weights (Keras save_weights of a compiled "
                                   "model), not a weight")),
)


_WILDCARDS = frozenset("*?[")


def glob_match(name: str, pattern: str) -> bool:
    """``fnmatch.fnmatchcase(name, pattern)``, without compiling a regex for ``*suffix`` and ``prefix*`` globs.

    Most globs hubload checks (the buffers below, a family's ignores, ``head.*``) have one ``*`` at one end; the
    first fnmatch of a pattern in a process compiles it, about 0.1 ms each, which a cold load would pay per glob.
    """
    if pattern.startswith("*") and _WILDCARDS.isdisjoint(pattern[1:]):
        return name.endswith(pattern[1:])
    if pattern.endswith("*") and _WILDCARDS.isdisjoint(pattern[:-1]):
        return name.startswith(pattern[:-1])
    return fnmatch.fnmatchcase(name, pattern)


def ignorable_reason(name: str, side: str) -> str | None:
    """Why an unpaired tensor may be ignored, or None if it is a real problem.

    Args:
        name: Canonical name present on only one side.
        side: "checkpoint" (the model lacks it) or "model" (the checkpoint lacks it).

    Returns:
        The reason string, or None.
    """
    for pattern, where, reason in NON_PERSISTENT_BUFFERS:
        if (where == "both" or where == side) and glob_match(name, pattern):
            return reason
    return None
