"""Load pretrained weights into an FSDP2 model built on the meta device: each rank reads only its own shard.

    torchrun --standalone --nproc-per-node 4 examples/fsdp_load.py [--model seed-mlp]

The model is built on ``meta`` (no memory), ``fully_shard`` is applied per layer and then to the root, and
``hubload.load(id, model=model)`` does the rest: local rank 0 of each node pulls the file into the cache once,
the compatibility check runs on the global shapes, and every rank reads just its slice of each tensor from the
verified file into fresh local memory (uneven last shards included: 10 rows over 4 ranks are 3, 3, 3 and 1).
If any rank fails, every rank raises the same HubloadError and no rank's model changes.

Each rank then checks its sharded forward pass against the dense model (loaded the ordinary way) and prints
one line; exit status 1 on a failed load or a mismatch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import hubload
from hubload.zoo.torch_models import mlp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed-mlp", help="registry ID of an MLP checkpoint (default: seed-mlp)")
    parser.add_argument("--cache", type=Path, help="cache root shared by the node's ranks (default: HUBLOAD_CACHE)")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # CPU anywhere; on GPUs: nccl, torch.cuda.set_device(local rank), mesh "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    with torch.device("meta"):  # no memory until the weights arrive, shard by shard
        model = mlp(in_features=64, hidden=64, num_classes=10)
    for layer in (model.dense1, model.dense2):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    status = 0
    try:
        hubload.load(args.model, model=model, cache_dir=args.cache)
        dense = hubload.load(args.model, framework="torch", cache_dir=args.cache)  # the reference, whole
    except hubload.HubloadError as exc:
        print(f"rank {rank}/{world}: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    else:
        shards = {n: list(p.to_local().shape) for n, p in model.named_parameters() if isinstance(p, DTensor)}
        x = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = model(x), dense(x)
        rel = float((got - want).abs().max() / want.abs().max())
        ok = rel <= 1e-5
        print(f"rank {rank}/{world}: local shards {shards}; sharded forward vs dense: max relative difference "
              f"{rel:.1e} ({'OK' if ok else 'MISMATCH'})", flush=True)
        status = 0 if ok else 1
    dist.barrier()  # everyone has reported before anyone exits
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
