"""Scenarios run by tests/adapters/test_fsdp_load.py inside one ``torchrun --nproc-per-node 4`` job (gloo, CPU).

    torchrun --nproc-per-node 4 tests/adapters/fsdp_scenarios.py CKPT_DIR OUT_DIR REGISTRY [SCENARIO,...]

``CKPT_DIR`` holds what the test wrote: ``model.safetensors``, ``model.pt``, ``sharded/`` (an index and two
shards) and ``ref_input.pt``/``ref_output.pt`` (the dense reference forward pass); REGISTRY names the same file as the
pinned entry ``fsdp-net`` on the Hub look-alike at ``HF_ENDPOINT``. Each rank writes
``OUT_DIR/rank-<N>.json``: scenario -> {"ok": ..., "error": type, "message", checks...}. Every collective has a
timeout, so a hang fails the job instead of waiting forever.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import hubload

# Dims not divisible by 4 on purpose: FSDP2's uneven last shard (10 -> 3,3,3,1) and an empty shard (3 -> 1,1,1,0).
IN, HIDDEN, OUT = 12, 10, 3


class Net(nn.Module):
    """Two Linear layers, a LayerNorm, a persistent buffer: every kind of state_dict entry FSDP2 sees."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, OUT)
        self.register_buffer("scale", torch.ones(OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x)))) * self.scale


def sharded_net(mesh, *, meta: bool, hidden: int = HIDDEN) -> Net:
    """``fully_shard`` per layer, then the root, on ``mesh``; built on meta when asked."""
    if meta:
        with torch.device("meta"):
            model = Net(hidden)
    else:
        torch.manual_seed(1234 + dist.get_rank())  # different junk on every rank: the load must overwrite it all
        model = Net(hidden)
    for layer in (model.fc1, model.norm, model.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reference(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint read whole by safetensors itself (test oracle only)."""
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def shard_check(model: nn.Module, ref: dict[str, torch.Tensor]) -> dict[str, object]:
    """Every entry equals the checkpoint exactly: DTensors gathered with torch's own ``full_tensor``."""
    bad = []
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if full.is_meta or not torch.equal(full.cpu(), ref[name]):
            bad.append(name)
    kinds = sorted({type(v).__name__ for v in model.state_dict().values()})
    return {"bad": bad, "kinds": kinds}


def local_check(model: nn.Module) -> dict[str, list[int]]:
    """Local shard shapes per DTensor entry (the test checks uneven ones)."""
    return {n: list(v.to_local().shape) for n, v in model.state_dict().items() if isinstance(v, DTensor)}


def forward_check(model: nn.Module, ckpt: Path) -> float:
    """Relative max difference between the sharded forward pass and the dense reference output."""
    x = torch.load(ckpt / "ref_input.pt", weights_only=True)
    want = torch.load(ckpt / "ref_output.pt", weights_only=True)
    with torch.no_grad():
        got = model(x)
    return float((got - want).abs().max() / want.abs().max())


def rss_kib() -> int:
    """Peak RSS (VmHWM) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def scenarios(ckpt: Path, registry: Path) -> dict[str, object]:
    """name -> callable returning a dict of observations (raising on a load failure)."""
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref = reference(ckpt)

    def meta_safetensors():
        model = sharded_net(mesh, meta=True)
        hubload.load(ckpt / "model.safetensors", model=model)
        return {**shard_check(model, ref), "local": local_check(model), "rel": forward_check(model, ckpt)}

    def materialised_safetensors():
        model = sharded_net(mesh, meta=False)
        ptr = model.fc1.weight.to_local().data_ptr()
        hubload.load(ckpt / "model.safetensors", model=model)
        return {**shard_check(model, ref), "rel": forward_check(model, ckpt),
                "in_place": model.fc1.weight.to_local().data_ptr() == ptr}

    def sharded_index():
        model = sharded_net(mesh, meta=True)
        hubload.load(ckpt / "sharded" / "model.safetensors.index.json", model=model)
        return {**shard_check(model, ref), "rel": forward_check(model, ckpt)}

    def pickle_meta():  # a zip torch pickle: each rank preads its box too (counted here)
        from hubload.adapters import torch_dtensor

        model = sharded_net(mesh, meta=True)
        calls, original = [], torch_dtensor.read_region
        torch_dtensor.read_region = lambda *a, **k: calls.append(a[0]) or original(*a, **k)
        try:
            hubload.load(ckpt / "model.pt", model=model)
        finally:
            torch_dtensor.read_region = original
        return {**shard_check(model, ref), "rel": forward_check(model, ckpt), "preads": len(calls)}

    def hsdp_2d():  # fully_shard on a 2-D mesh: (Replicate, Shard(0)) placements
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        model = sharded_net(mesh2, meta=True)
        hubload.load(ckpt / "model.safetensors", model=model)
        placements = sorted({str(v.placements) for v in model.state_dict().values() if isinstance(v, DTensor)})
        return {**shard_check(model, ref), "rel": forward_check(model, ckpt), "placements": placements}

    def tensor_2d():  # hand-made DTensors: a weight cut along both dims of a 2x2 mesh, a replicated bias
        mesh2 = init_device_mesh("cpu", (2, 2))
        model = Net()
        with torch.no_grad():
            model.fc1.weight = nn.Parameter(distribute_tensor(torch.zeros(HIDDEN, IN), mesh2, [Shard(0), Shard(1)]))
            model.fc1.bias = nn.Parameter(distribute_tensor(torch.zeros(HIDDEN), mesh2, [Replicate(), Replicate()]))
            model.fc2.weight = nn.Parameter(distribute_tensor(torch.zeros(OUT, HIDDEN), mesh2, [Shard(1), Shard(0)]))
        hubload.load(ckpt / "model.safetensors", model=model)
        return {**shard_check(model, ref), "local": local_check(model)}

    def mismatch_on_one_rank():  # rank 1's model is wider: its compat check fails before any read
        model = sharded_net(mesh, meta=True, hidden=HIDDEN + (4 if rank == 1 else 0))
        try:
            hubload.load(ckpt / "model.safetensors", model=model)
        finally:
            untouched = all(v.to_local().is_meta for v in model.state_dict().values() if isinstance(v, DTensor))
            RESULT_EXTRA["untouched"] = untouched

    def read_error_on_one_rank():  # rank 2's pread fails after every rank passed the check
        model = sharded_net(mesh, meta=False)
        before = {k: v.to_local().clone() if isinstance(v, DTensor) else v.clone() for k, v in model.state_dict().items()}
        original = os.preadv

        def broken(fd, buffers, offset, *args):
            raise OSError(5, "Input/output error (injected)")

        if rank == 2:
            os.preadv = broken
        try:
            hubload.load(ckpt / "model.safetensors", model=model)
        finally:
            os.preadv = original
            after = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
            RESULT_EXTRA["untouched"] = all(torch.equal(before[k], after[k]) for k in before)

    def ddp_unchanged():
        from torch.nn.parallel import DistributedDataParallel

        torch.manual_seed(rank)
        model = DistributedDataParallel(Net())
        hubload.load(ckpt / "model.safetensors", model=model)
        return {**shard_check(model.module, ref), "rel": forward_check(model.module, ckpt)}

    def hub_registry_entry():  # pinned hf:// entry on the Hub look-alike (HF_ENDPOINT), one node cache
        model = sharded_net(mesh, meta=True)
        hubload.load("fsdp-net", model=model, registry=registry)
        return {**shard_check(model, ref), "rel": forward_check(model, ckpt)}

    def plain_unchanged():
        model = Net()
        hubload.load(ckpt / "model.safetensors", model=model)
        return {**shard_check(model, ref), "rel": forward_check(model, ckpt)}

    return {f.__name__: f for f in (meta_safetensors, materialised_safetensors, sharded_index, pickle_meta, hsdp_2d,
                                    tensor_2d, mismatch_on_one_rank, read_error_on_one_rank, ddp_unchanged,
                                    plain_unchanged, hub_registry_entry)}


RESULT_EXTRA: dict[str, object] = {}


def main() -> int:
    ckpt, out, registry = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    only = set(sys.argv[4].split(",")) if len(sys.argv) > 4 else None
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    results: dict[str, object] = {}
    for name, fn in scenarios(ckpt, registry).items():
        if only and name not in only:
            continue
        RESULT_EXTRA.clear()
        try:
            record = {"ok": True, **(fn() or {})}
        except hubload.HubloadError as exc:
            record = {"ok": False, "error": type(exc).__name__, "message": str(exc),
                      "notes": list(getattr(exc, "__notes__", []))}
        except Exception as exc:  # not a HubloadError: the test fails on it
            record = {"ok": False, "error": f"raw {type(exc).__name__}", "message": traceback.format_exc()}
        record.update(RESULT_EXTRA)
        results[name] = record
        dist.barrier()  # every rank finished the scenario: nobody is left waiting in a collective
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
