"""One timed operation, run in a fresh interpreter: ``python bench/child.py OP '<json args>'``.

Prints one JSON object on the last stdout line: ``seconds`` (the operation only, imports excluded), plus
what the op measures (``calls``, ``connects``, ``rss_growth`` ...). Running each measurement in its own process
keeps caches, threads and imports of one tool from helping or hurting another.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any


def _count_connects() -> list[int]:
    """Count outgoing socket connections made from now on (proves a warm hit stays off the network)."""
    counter = [0]
    orig_connect, orig_cc = socket.socket.connect, socket.create_connection

    def connect(self: socket.socket, *a: Any, **k: Any) -> Any:
        counter[0] += 1
        return orig_connect(self, *a, **k)

    def create_connection(*a: Any, **k: Any) -> Any:
        counter[0] += 1
        return orig_cc(*a, **k)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.create_connection = create_connection  # type: ignore[assignment]
    return counter


def hubload_pull(a: dict[str, Any]) -> dict[str, Any]:
    """Cold pull of a registry entry into an empty cache (module imports done first, as for the baselines)."""
    import hubload.fetch
    import hubload.transfer  # noqa: F401 - imported lazily by pull; the baselines import their library too
    import huggingface_hub  # noqa: F401 - hubload's hf:// source imports it (config.hf_token); see README

    t = time.perf_counter()
    out = hubload.fetch.pull(a["model"], registry=a["registry"], cache_dir=a["cache"], progress=False,
                            parallel=a.get("parallel"))
    dt = time.perf_counter() - t
    return {"seconds": dt, "bytes": sum(p.stat().st_size for p in out.values())}


def hf_download(a: dict[str, Any]) -> dict[str, Any]:
    """hf_hub_download of one file into an empty cache."""
    from huggingface_hub import hf_hub_download

    t = time.perf_counter()
    p = hf_hub_download(a["repo"], a["file"], revision=a["commit"], cache_dir=a["cache"])
    return {"seconds": time.perf_counter() - t, "bytes": os.path.getsize(p)}


def hf_snapshot(a: dict[str, Any]) -> dict[str, Any]:
    """snapshot_download of a whole repo into an empty cache."""
    from huggingface_hub import snapshot_download

    t = time.perf_counter()
    p = snapshot_download(a["repo"], revision=a["commit"], cache_dir=a["cache"])
    dt = time.perf_counter() - t
    return {"seconds": dt, "bytes": sum(f.stat().st_size for f in Path(p).iterdir())}


def hubload_warm(a: dict[str, Any]) -> dict[str, Any]:
    """``hubload.pull`` of a cached pinned entry, repeated; counts connection attempts."""
    import hubload.fetch
    from hubload.cache import Cache
    from hubload.registry import load_registry

    reg = load_registry(a["registry"])
    cache = Cache(a["cache"])
    entry = reg.get(a["model"])
    hubload.fetch.pull_entry(entry, cache=cache)  # first call may create the snapshot links
    counter = _count_connects()
    n = a["n"]
    t = time.perf_counter()
    for _ in range(n):
        hubload.fetch.pull_entry(entry, cache=cache)
    dt = time.perf_counter() - t
    t2 = time.perf_counter()
    for _ in range(n):
        hubload.fetch.pull(a["model"], registry=reg, cache_dir=a["cache"])
    dt2 = time.perf_counter() - t2
    return {"seconds": dt / n, "seconds_by_id": dt2 / n, "connects": counter[0], "calls": 2 * n}


def hf_warm(a: dict[str, Any]) -> dict[str, Any]:
    """``hf_hub_download`` of a cached file, repeated (server up: one HEAD per call)."""
    from huggingface_hub import hf_hub_download

    hf_hub_download(a["repo"], a["file"], revision=a["commit"], cache_dir=a["cache"])
    counter = _count_connects()
    n = a["n"]
    t = time.perf_counter()
    for _ in range(n):
        hf_hub_download(a["repo"], a["file"], revision=a["commit"], cache_dir=a["cache"])
    return {"seconds": (time.perf_counter() - t) / n, "connects": counter[0], "calls": n}


def _torch_bert(config: dict[str, Any]) -> Any:
    """transformers' BertModel from the MiniLM config.json (no download), as hubload builds the entry."""
    import transformers

    from hubload.adapters import hf_families

    return hf_families.build(transformers.BertModel, config)


def _keras_bert(config: dict[str, Any]) -> Any:
    """keras-hub's BertBackbone from the MiniLM config.json (no download), as hubload builds the entry."""
    import keras_hub

    from hubload.adapters import hf_families

    return hf_families.build(keras_hub.models.BertBackbone, config)


def torch_load_baseline(a: dict[str, Any]) -> dict[str, Any]:
    """safetensors.torch.load_file + load_state_dict into transformers' BertModel (model built before timing).

    It reads the very file hubload loads, from hubload's cache (pulled before the clock): the two then map pages
    of the same file system. Reading the package's copy instead (on the VM's disk, while the bench caches live
    on tmpfs) made the baseline 1.5-2.5 ms faster for that reason alone (tmpfs pages map slower here).
    """
    import safetensors.torch
    import torch  # noqa: F401

    path = _cached_minilm(a)
    model = _torch_bert(a["config"])
    t = time.perf_counter()
    sd = safetensors.torch.load_file(path)
    res = model.load_state_dict(sd, strict=False)  # strict=False: the file's embeddings.position_ids buffer
    dt = time.perf_counter() - t
    return {"seconds": dt, "missing": len(res.missing_keys), "unexpected": len(res.unexpected_keys)}


def keras_load_baseline(a: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays already in Keras layout, then ``assign`` into keras-hub's BertBackbone (preparation not timed).

    The mapping (Hub name -> variable, re-layout) is keras-hub's own converter as hubload records it
    (``hf_families.keras_spec``); a hand-written loader would hard-code the same table.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import safetensors.numpy

    from hubload.adapters import hf_families
    from hubload.families import family_for_class
    from hubload.layout import apply_transform

    model = _keras_bert(a["config"])
    family, _ = family_for_class(type(model))
    ckpt = safetensors.numpy.load_file(a["path"])
    pairs = []
    for name, target in hf_families.keras_spec(model, family).items():
        arr = ckpt[name]
        if not isinstance(target.handle, hf_families.PortGroup):  # a group splits the Hub tensor in its assign
            arr = apply_transform(arr, target.transform)
            if tuple(arr.shape) != tuple(target.handle.shape):
                raise SystemExit(f"{name}: {arr.shape} does not fit {target.handle.path} {target.handle.shape}")
        # contiguous, Keras layout and dtype, as a hand-written loader would hold it
        pairs.append((target.handle, np.ascontiguousarray(arr, dtype=np.dtype(target.handle.dtype))))
    t = time.perf_counter()
    for var, arr in pairs:
        var.assign(arr)
    dt = time.perf_counter() - t
    return {"seconds": dt, "assigned": len(pairs), "variables": len(model.weights)}


def meta_rss_baseline(a: dict[str, Any]) -> dict[str, Any]:
    """Raw load of a large safetensors into a model built on ``meta`` (load_state_dict(assign=True)); RSS growth."""
    import safetensors.torch
    import torch

    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(a["width"], a["width"], bias=False) for _ in range(a["layers"])])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    sd = safetensors.torch.load_file(a["path"])
    model.load_state_dict(sd, assign=True)
    # load_file maps the file lazily: touch every page (one float in 1024), as a forward pass would, so RSS shows it.
    checksum = sum(float(p.detach().reshape(-1)[::1024].view(torch.int32).sum()) for p in model.parameters())
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": dt, "rss_growth": peak - before, "checkpoint": os.path.getsize(a["path"]), "checksum": checksum}


def _import_load_path() -> None:
    """Import the modules hubload.load uses (lazily) before the clock, as the baselines import theirs."""
    import hubload.api  # noqa: F401
    import hubload.compat  # noqa: F401
    import hubload.distributed  # noqa: F401
    import hubload.fetch  # noqa: F401
    import hubload.layout  # noqa: F401
    import hubload.readers  # noqa: F401
    import hubload.resolve  # noqa: F401


def _cached_minilm(a: dict[str, Any]) -> str:
    """Pull the MiniLM entry once (a warm hit afterwards), outside any timing; the cached file's path."""
    import hubload

    files = hubload.pull(a["model"], registry=a["registry"], cache_dir=a["cache"], progress=False)
    return str(files["model.safetensors"])


def _timed_minilm_load(a: dict[str, Any], build: Any) -> dict[str, Any]:
    """Cache the MiniLM entry, build the model with ``build(config)``, then time ``hubload.load(id, model=model)``."""
    import hubload

    _import_load_path()
    _cached_minilm(a)
    model = build(a["config"])
    t = time.perf_counter()
    _, report = hubload.load(a["model"], model=model, registry=a["registry"], cache_dir=a["cache"],
                             return_report=True)
    dt = time.perf_counter() - t
    return {"seconds": dt, "matched": len(report.matched), "ok": report.ok}


def torch_load_hubload(a: dict[str, Any]) -> dict[str, Any]:
    """``hubload.load(id, model=bert_model)`` of a cached pinned entry (resolve + check + apply), model built first."""
    import torch  # noqa: F401

    import hubload.api  # noqa: F401 - imported before timing, as the baseline imports safetensors.torch
    from hubload.adapters import torch as _adapter  # noqa: F401

    return _timed_minilm_load(a, _torch_bert)


def keras_load_hubload(a: dict[str, Any]) -> dict[str, Any]:
    """``hubload.load(id, model=backbone)`` from the torch-layout file: re-layouts included in the time."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import hubload.api  # noqa: F401
    from hubload.adapters import hf_families as _families  # noqa: F401 - the backbone's spec comes from it
    from hubload.adapters import tf as _adapter  # noqa: F401

    return _timed_minilm_load(a, _keras_bert)


def meta_rss_hubload(a: dict[str, Any]) -> dict[str, Any]:
    """``hubload.load(path, model=meta_model)``: materialised from the mmap; RSS growth measured like the baseline."""
    import torch

    import hubload
    import hubload.api  # noqa: F401
    from hubload.adapters import torch as _adapter  # noqa: F401

    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(a["width"], a["width"], bias=False) for _ in range(a["layers"])])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    hubload.load(a["path"], model=model)
    checksum = sum(float(p.detach().reshape(-1)[::1024].view(torch.int32).sum()) for p in model.parameters())
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": dt, "rss_growth": peak - before, "checkpoint": os.path.getsize(a["path"]), "checksum": checksum}


def import_check(a: dict[str, Any]) -> dict[str, Any]:
    """Which heavy frameworks ``import hubload`` pulls in."""
    import hubload  # noqa: F401

    return {"seconds": 0.0, "heavy": sorted(m for m in ("torch", "tensorflow", "numpy", "keras") if m in sys.modules)}


OPS = {f.__name__: f for f in (hubload_pull, hf_download, hf_snapshot, hubload_warm, hf_warm, torch_load_baseline,
                               keras_load_baseline, meta_rss_baseline, torch_load_hubload, keras_load_hubload,
                               meta_rss_hubload, import_check)}

if __name__ == "__main__":
    result = OPS[sys.argv[1]](json.loads(sys.argv[2]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
