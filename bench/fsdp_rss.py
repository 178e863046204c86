"""Peak RSS growth per rank of a sharded load: 4 CPU ranks (torchrun, gloo), an FSDP2 model built on meta.

    python bench/fsdp_rss.py [--sizes 512,1024] [--nproc 4] [--dir DIR]

For each checkpoint size, one torchrun job per tool. Every rank imports everything, does a small warm-up load
(imports, gloo, allocator), resets its peak RSS (``/proc/self/clear_refs`` = 5), loads, and reports
``VmHWM - VmRSS before`` from ``/proc/self/status``: the memory that load added at its peak, in that rank.

* hubload: ``hubload.load(file, model=fsdp_model)`` (each rank ``pread``\\ s its boxes into fresh local tensors).
* baseline: what a user writes with safetensors' own slicing: ``safe_open(...).get_slice(name)[box]`` for each
  rank's box, then ``load_state_dict(assign=True)`` with ``DTensor.from_local``.
* dcp: torch.distributed.checkpoint's ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``,
  rank 0 holding the whole file (``safetensors.torch.load_file``), after ``to_empty``.

After the load each rank sums its local values (inside the measured window), so memory that a tool maps lazily
is counted once it is actually read, as it will be in the first training step.

The row reports the worst rank's growth over the checkpoint size (target <= 0.4x with 4 ranks: a quarter plus
working room) and its ratio to the baseline's worst rank. ``bench/run.py`` runs it as row 10.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 1 << 20
WIDTH = 4096  # one [4096, 4096] float32 Linear weight = 64 MiB
TIMEOUT = 900
TOOLS = ("hubload", "baseline", "dcp")


# ----------------------------------------------------------------------------------------------- driver


def write_checkpoint(path: Path, size_mib: int) -> Path:
    """A float32 safetensors of ``size_mib / 64`` square Linear weights named ``<i>.weight`` (random bytes)."""
    if path.exists():
        return path
    layers = max(1, size_mib // 64)
    nbytes = WIDTH * WIDTH * 4
    header = {f"{i}.weight": {"dtype": "F32", "shape": [WIDTH, WIDTH], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
              for i in range(layers)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".part")
    rng = __import__("random").Random(7)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        block = bytearray(rng.randbytes(16 * MIB))
        for i in range(nbytes * layers // len(block)):
            block[:8] = i.to_bytes(8, "little")  # not one repeated page: no sharing tricks can hide a copy
            f.write(block)
    tmp.replace(path)
    return path


def run_job(path: Path, tool: str, nproc: int = 4) -> list[dict[str, Any]]:
    """One torchrun job of ``tool`` on ``path``; the per-rank results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = path.with_name(f"{path.stem}-{tool}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
           str(nproc), str(Path(__file__).resolve()), "--worker", str(path), "--tool", tool, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"{tool}: torchrun did not finish within {TIMEOUT}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{tool}: torchrun failed:\n{err[-3000:]}")
    return json.loads(out.read_text())


def measure(work: Path, size_mib: int, nproc: int = 4) -> dict[str, Any]:
    """Both tools on one checkpoint size: per-rank growth in bytes and the worst rank over the file size."""
    path = write_checkpoint(work / f"fsdp-{size_mib}.safetensors", size_mib)
    size = path.stat().st_size
    result: dict[str, Any] = {"checkpoint": size, "nproc": nproc}
    for tool in TOOLS:
        ranks = run_job(path, tool, nproc)
        result[tool] = {"ranks": ranks, "worst": max(r["growth"] for r in ranks) / size}
    return result


def row_text(m: dict[str, Any]) -> tuple[str, str, float, bool]:
    """(hubload cell, baseline cell, ratio to the get_slice baseline, target met) for bench/run.py's table."""
    h, b, d = m["hubload"]["worst"], m["baseline"]["worst"], m["dcp"]["worst"]
    return (f"{h:.2f}x checkpoint (worst of {m['nproc']} ranks)",
            f"{b:.2f}x (safetensors get_slice); {d:.2f}x (DCP broadcast_from_rank0)",
            h / b if b else float("nan"), h <= 0.4)


# ----------------------------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(path: Path, tool: str, out: Path) -> None:
    """One rank: build, warm up, reset the peak, load, report."""
    import datetime
    import time

    import torch
    import torch.distributed as dist
    from safetensors import safe_open
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    import hubload
    import hubload.adapters.torch  # noqa: F401  (imported before the measurement, like the baseline's imports)
    import hubload.adapters.torch_dtensor  # noqa: F401

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        width = f.get_slice(names[0]).get_shape()[0]

    def build(layers: int, w: int) -> nn.Module:
        with torch.device("meta"):
            model = nn.Sequential(*[nn.Linear(w, w, bias=False) for _ in range(layers)])
        for layer in model:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def baseline(model: nn.Module, file: Path) -> None:
        state = {}
        with safe_open(str(file), framework="pt") as f:
            for name, target in model.state_dict().items():
                shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                      target.placements)
                local = f.get_slice(name)[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                state[name] = DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                                 shape=target.shape, stride=target.stride())
            model.load_state_dict(state, strict=False, assign=True)

    def dcp(model: nn.Module, file: Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.to_empty(device="cpu")
        full = load_file(str(file)) if dist.get_rank() == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    load = {"hubload": lambda m, p: hubload.load(p, model=m), "baseline": baseline, "dcp": dcp}[tool]
    # Warm-up on a small file of the same kind: imports, gloo, the allocator's first arenas.
    small = Path(tempfile.gettempdir()) / f"hubload-fsdp-warm-{os.getpid()}.safetensors"
    from safetensors.torch import save_file

    save_file({f"{i}.weight": torch.randn(64, 64) for i in range(2)}, str(small))
    load(build(2, 64), small)
    small.unlink()
    model = build(len(names), width)
    dist.barrier()

    reset = _reset_peak()
    before_rss, before_hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
    t = time.perf_counter()
    load(model, path)
    seconds = time.perf_counter() - t
    # Touch every local value (a lazily mapped slice costs its pages only once read, as in training it will be).
    checksum = sum(float(v.to_local().sum()) for v in model.state_dict().values())
    peak = _status_kib("VmHWM")
    growth = (peak - before_rss if reset else peak - before_hwm) * 1024
    local = sum(v.to_local().numel() * v.to_local().element_size() for v in model.state_dict().values())
    mine = {"rank": dist.get_rank(), "growth": growth, "local_bytes": local, "seconds": seconds, "peak_reset": reset,
            "checksum": checksum}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Driver (default) or one rank (``--worker``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="512,1024", help="checkpoint sizes in MiB (default: %(default)s)")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.tool, args.out)
        return 0
    work = Path(tempfile.mkdtemp(prefix="hubload-fsdp-rss-", dir=args.dir))
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            m = measure(work, size, args.nproc)
            ours, base, ratio, met = row_text(m)
            print(f"{size} MiB, {args.nproc} ranks: hubload {ours} | baseline {base} | ratio {ratio:.2f} | "
                  f"target <= 0.4x: {'met' if met else 'NOT met'}")
            print("  per rank (MiB):", "; ".join(f"{tool} {[round(r['growth'] / MIB) for r in m[tool]['ranks']]}"
                                                 for tool in TOOLS))
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
