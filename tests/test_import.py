"""``import hubload`` stays framework-free: no torch, tensorflow, numpy (nor huggingface_hub) at import time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "tensorflow", "keras", "jax", "numpy", "huggingface_hub")

_PROBE = """
import json, sys, time
t = time.perf_counter()
import {module}
elapsed = time.perf_counter() - t
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
print(json.dumps({{"heavy": heavy, "seconds": elapsed}}))
"""


def _probe(module: str) -> dict:
    """Import ``module`` in a fresh interpreter; report heavy modules loaded and the import time."""
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(module=module, heavy=HEAVY)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["hubload", "hubload.cli", "hubload.fetch", "hubload.registry",
                                    "hubload.sources", "hubload.cache", "hubload.errors"])
def test_importing_the_core_loads_no_framework(module, record_property) -> None:
    result = _probe(module)
    record_property(f"import_seconds[{module}]", round(result["seconds"], 4))  # measured, never asserted
    assert result["heavy"] == [], f"`import {module}` imported {result['heavy']}"


def test_the_probe_can_see_a_heavy_import() -> None:
    """Guard against a probe that always reports nothing."""
    pytest.importorskip("numpy")
    assert "numpy" in _probe("numpy")["heavy"]
