"""Streaming Keras loads: peak RSS growth and time of ``hubload.load`` into a built Keras model.

``python bench/keras_stream.py [--layers 16] [--width 4096] [--runs 3] [--dir DIR]`` writes a float32
safetensors file in the torch layout (``layers`` Linear weights ``width x width``; 16 x 4096^2 = 1 GiB), then in
fresh processes builds a Keras model of ``layers`` bias-free Dense layers and loads the file, with hubload and
with the naive loop (``safetensors.safe_open`` + ``variable.assign(tensor.T)``). Each child measures the peak
RSS growth during the load alone (``/proc/self/clear_refs`` resets the high-water mark after the model is
built; ``VmHWM - VmRSS`` before), so the model's own variables do not count. Target: <= 0.3x the checkpoint.
Also run as scenario 10 of ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET = 0.3


def write_checkpoint(path: Path, width: int, layers: int) -> None:
    """A torch-layout safetensors file of ``layers`` [width, width] float32 weights named ``d<i>.weight``."""
    import struct

    import numpy as np

    nbytes = width * width * 4
    header = {f"d{i}.weight": {"dtype": "F32", "shape": [width, width], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
              for i in range(layers)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(layers):
            f.write(rng.standard_normal((width, width), dtype=np.float32).tobytes())
    os.replace(tmp, path)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(mode: str, path: str, width: int, layers: int) -> dict[str, Any]:
    """Build the model, reset the RSS high-water mark, load, report."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((width,))] +
                             [keras.layers.Dense(width, use_bias=False, name=f"d{i}") for i in range(layers)])
    if mode == "hubload":
        import hubload
        import hubload.adapters.tf  # noqa: F401 - import cost outside the measurement
    else:
        from safetensors import safe_open
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "hubload":
        hubload.load(path, model=model)
    else:
        with safe_open(path, "np") as f:
            for i in range(layers):
                model.get_layer(f"d{i}").kernel.assign(f.get_tensor(f"d{i}.weight").T)
    dt = time.perf_counter() - t0
    growth = _status("VmHWM") - before
    check = float(np.asarray(model.get_layer("d0").kernel.numpy()[0, :4]).sum())
    return {"seconds": dt, "rss_growth": growth, "checkpoint": os.path.getsize(path), "checksum": check}


def measure(path: Path, width: int, layers: int, runs: int) -> dict[str, Any]:
    """Medians of ``runs`` child runs per mode, and the ratios against the checkpoint and the naive loop."""
    out: dict[str, Any] = {}
    for mode in ("hubload", "naive"):
        results = []
        for _ in range(runs):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--path", str(path), "--width",
                                   str(width), "--layers", str(layers)], capture_output=True, text=True, check=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(HERE.parent)})
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out[mode] = results
    size = out["hubload"][0]["checkpoint"]
    gib = size / (1 << 30)
    h_rss = statistics.median(r["rss_growth"] for r in out["hubload"]) / size
    n_rss = statistics.median(r["rss_growth"] for r in out["naive"]) / size
    h_t = statistics.median(r["seconds"] for r in out["hubload"]) / gib
    n_t = statistics.median(r["seconds"] for r in out["naive"]) / gib
    if out["hubload"][0]["checksum"] != out["naive"][0]["checksum"]:
        raise RuntimeError("hubload and the naive loop loaded different values")
    return {"size": size, "hubload_rss": h_rss, "naive_rss": n_rss, "hubload_s_per_gib": h_t,
            "naive_s_per_gib": n_t, "raw": out, "loadavg": os.getloadavg()}


def rows(ctx: Any) -> list[Any]:
    """Scenario 10 of bench/run.py: the RSS row and the time-per-GiB row."""
    from run import Row  # bench/run.py is the caller; its directory is on sys.path

    layers = 4 if ctx.quick else 16
    path = ctx.work / "data" / f"keras-stream-{layers}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        write_checkpoint(path, 4096, layers)
    m = measure(path, 4096, layers, max(1, ctx.runs))
    mib = m["size"] >> 20
    return [
        Row("11", f"load {mib} MiB torch-layout checkpoint into a built Keras model: peak RSS growth",
            f"{m['hubload_rss']:.2f}x checkpoint", f"{m['naive_rss']:.2f}x checkpoint (safe_open + assign)",
            m["hubload_rss"] / m["naive_rss"] if m["naive_rss"] else 0.0, f"<= {TARGET}x checkpoint",
            m["hubload_rss"] <= TARGET, raw=m),
        Row("11t", "same load: time per GiB", f"{m['hubload_s_per_gib']:.2f} s/GiB",
            f"{m['naive_s_per_gib']:.2f} s/GiB (safe_open + assign)",
            m["hubload_s_per_gib"] / m["naive_s_per_gib"], "report only", True, raw={}),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=("hubload", "naive"))
    ap.add_argument("--path")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.path, args.width, args.layers)))
        return 0
    work = Path(args.dir or tempfile.mkdtemp(prefix="hubload-keras-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"keras-stream-{args.layers}x{args.width}.safetensors"
    if not path.exists():
        write_checkpoint(path, args.width, args.layers)
    m = measure(path, args.width, args.layers, args.runs)
    raw = m.pop("raw")
    print(json.dumps(m, indent=2))
    print(f"peak RSS growth: hubload {m['hubload_rss']:.3f}x checkpoint, naive {m['naive_rss']:.3f}x "
          f"(target <= {TARGET}x: {'met' if m['hubload_rss'] <= TARGET else 'NOT met'}); time: "
          f"hubload {m['hubload_s_per_gib']:.2f} s/GiB, naive {m['naive_s_per_gib']:.2f} s/GiB; load average "
          f"{m['loadavg']}", file=sys.stderr)
    del raw
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
