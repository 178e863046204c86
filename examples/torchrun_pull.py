"""Pull and load a registry model under torchrun: one download per node, the same weights on every rank.

    torchrun --standalone --nproc-per-node 4 examples/torchrun_pull.py --model all-minilm-l6-v2

Local rank 0 of each node pulls into the cache (``HUBLOAD_CACHE``, shared by the node's ranks) while the
other ranks wait on a barrier; then every rank loads from the cache, with no network request. If the pull
fails (server error, wrong bytes), every rank raises the same error instead of waiting forever.
``hubload.distributed.run_once_per_node`` does the coordination; ``hubload.pull``/``hubload.load`` use
it by themselves under an initialised process group, the explicit call below only makes it visible.

With ``--out DIR`` each rank writes ``rank-<N>.json``: the files it got, a sha256 of its ``state_dict`` (or
the error), so the ranks can be compared. Exit status 1 when the pull or load failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hubload
from hubload.distributed import local_rank, run_once_per_node


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over the state_dict's names, shapes, dtypes and bytes, in key order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{list(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed-mlp", help="registry ID to pull and load")
    parser.add_argument("--registry", type=Path, help="extra registry YAML (looked up before the built-in one)")
    parser.add_argument("--cache", type=Path, help="cache root shared by the node's ranks (default: HUBLOAD_CACHE)")
    parser.add_argument("--out", type=Path, help="folder for one rank-<N>.json per rank")
    args = parser.parse_args()

    # gloo runs on CPU anywhere; a GPU job would use nccl and torch.cuda.set_device(local_rank()) first.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict[str, object] = {"rank": rank, "local_rank": local_rank(rank), "world_size": world}
    status = 0
    try:
        files = run_once_per_node(lambda: hubload.pull(args.model, registry=args.registry, cache_dir=args.cache),
                                  label=args.model)
        model = hubload.load(args.model, framework="torch", registry=args.registry, cache_dir=args.cache)
        record.update(files={k: str(v) for k, v in files.items()}, digest=state_dict_digest(model))
        print(f"rank {rank}/{world}: loaded {args.model}, state_dict sha256 {record['digest'][:16]}")
    except hubload.HubloadError as exc:
        record.update(error=type(exc).__name__, message=str(exc))
        print(f"rank {rank}/{world}: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank-{rank}.json").write_text(json.dumps(record))
    # Everyone has reported before anyone exits: torchrun stops the remaining ranks on the first failure.
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
