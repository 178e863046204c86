"""Loading into FSDP2 / DTensor models under torchrun: 4 CPU ranks (gloo), each reading only its own shard.

One ``torchrun`` job runs every scenario of ``fsdp_scenarios.py`` (start-up dominates: ~20 s on 2 busy cores);
each rank writes what it saw, and the tests here judge it against the dense model, which this process builds
and runs itself. The job has a hard timeout: a rank that hangs fails the tests instead of the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).with_name("fsdp_scenarios.py")
NPROC = 4
TIMEOUT = 240  # seconds for the whole job (~20 s when idle)

sys.path.insert(0, str(SCENARIOS.parent))
from fsdp_scenarios import HIDDEN, IN, OUT, Net  # noqa: E402

from tests.servers import HubServer  # noqa: E402


def write_checkpoints(folder: Path) -> dict[str, torch.Tensor]:
    """The dense model's weights as safetensors, a torch pickle and a two-shard index, plus a reference forward."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # non-default buffer and norm values, so a skipped tensor shows
        model.scale.copy_(torch.rand(OUT) + 0.5)
        model.norm.weight.add_(torch.rand(HIDDEN))
        model.norm.bias.add_(torch.rand(HIDDEN))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    torch.save(state, folder / "model.pt")
    sharded = folder / "sharded"
    sharded.mkdir()
    first = {k: v for k, v in state.items() if k.startswith("fc1.")}
    second = {k: v for k, v in state.items() if k not in first}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(first, str(sharded / names[0]))
    save_file(second, str(sharded / names[1]))
    weight_map = {**dict.fromkeys(first, names[0]), **dict.fromkeys(second, names[1])}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    x = torch.randn(5, IN)
    torch.save(x, folder / "ref_input.pt")
    with torch.no_grad():
        torch.save(model(x), folder / "ref_output.pt")
    return state


def torchrun(script: Path, args: list[str], *, cwd: Path, env: dict[str, str],
             nproc: int = NPROC) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` with a hard timeout that kills the whole process group."""
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
           str(nproc), str(script), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT}s (a rank hangs)\nstdout:\n{out}\nstderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


REPO, COMMIT = "hubload-test/fsdp-net", "f5d9" * 10


def write_registry(path: Path, ckpt: Path) -> Path:
    """A registry entry ``fsdp-net``: the checkpoint on the Hub look-alike, pinned by commit and sha256."""
    data = (ckpt / "model.safetensors").read_bytes()
    path.write_text(f"""version: 1
models:
  fsdp-net:
    source: hf://{REPO}
    revision: {COMMIT}
    files:
      - {{path: model.safetensors, sha256: {hashlib.sha256(data).hexdigest()}, size: {len(data)}}}
    format: safetensors
    layout: torch
""")
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """Run every scenario once on 4 ranks; scenario -> [record of rank 0, 1, 2, 3], plus the hub's requests."""
    base = tmp_path_factory.mktemp("fsdp")
    state = write_checkpoints(base / "ckpt")
    registry = write_registry(base / "registry.yaml", base / "ckpt")
    with HubServer() as hub:
        hub.add_file(REPO, COMMIT, "model.safetensors", base / "ckpt" / "model.safetensors", lfs=True)
        res = torchrun(SCENARIOS, [str(base / "ckpt"), str(base / "out"), str(registry)], cwd=base,
                       env={"HF_ENDPOINT": hub.url, "HUBLOAD_CACHE": str(base / "node-cache")})
        hub.wait_idle()
        gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
        transfer = {"whole": sum(r.header("Range") is None for r in gets), "ranged": sum(r.header("Range") is not None
                                                                                        for r in gets)}
    assert res.returncode == 0, res.stderr[-6000:]
    ranks = [json.loads((base / "out" / f"rank-{r}.json").read_text()) for r in range(NPROC)]
    return {"state": state, "hub_transfer": transfer, **{name: [r[name] for r in ranks] for name in ranks[0]}}


def _chunks(n: int) -> list[int]:
    """FSDP2's Shard(0) sizes on 4 ranks, from torch.chunk (the last ranks may get 0)."""
    sizes = [len(c) for c in torch.arange(n).chunk(NPROC)]
    return sizes + [0] * (NPROC - len(sizes))


def _assert_loaded(records: list[dict]) -> None:
    for rank, rec in enumerate(records):
        assert rec["ok"], f"rank {rank}: {rec.get('error')}: {rec.get('message')}"
        assert rec["bad"] == [], f"rank {rank}: entries differing from the checkpoint: {rec['bad']}"
        if "rel" in rec:
            assert rec["rel"] <= 1e-5, f"rank {rank}: sharded forward differs from the dense one by {rec['rel']}"


@pytest.mark.parametrize("scenario", ["meta_safetensors", "materialised_safetensors", "sharded_index", "pickle_meta"])
def test_fully_shard_per_layer_holds_the_checkpoint_and_matches_the_dense_forward(job, scenario):
    _assert_loaded(job[scenario])
    assert all("DTensor" in rec["kinds"] for rec in job[scenario])  # the load kept the parameters sharded


def test_zip_pickle_shards_are_read_straight_from_the_file(job):
    # every one of the 6 sharded entries goes through the pread path (the buffer is not a DTensor)
    assert [rec["preads"] for rec in job["pickle_meta"]] == [6] * NPROC


def test_registry_model_on_the_hub_is_downloaded_once_for_the_node(job):
    _assert_loaded(job["hub_registry_entry"])
    # local rank 0 downloaded the file once (after one Range read of its header for the pre-check); the other
    # ranks read their shards from the node's cache
    assert job["hub_transfer"] == {"whole": 1, "ranged": 1}, job["hub_transfer"]


def test_uneven_last_shard_and_empty_shard(job):
    locals_ = [rec["local"] for rec in job["meta_safetensors"]]
    assert [loc["fc1.weight"] for loc in locals_] == [[n, IN] for n in _chunks(HIDDEN)]  # 3, 3, 3, 1
    assert [loc["fc2.weight"] for loc in locals_] == [[n, HIDDEN] for n in _chunks(OUT)]  # 1, 1, 1, 0
    assert [loc["norm.bias"] for loc in locals_] == [[n] for n in _chunks(HIDDEN)]


def test_materialised_model_is_loaded_in_place(job):
    assert all(rec["in_place"] for rec in job["materialised_safetensors"])


def test_two_dim_meshes_and_replicate(job):
    _assert_loaded(job["hsdp_2d"])
    assert {p for rec in job["hsdp_2d"] for p in rec["placements"]} == {"(Replicate(), Shard(dim=0))"}
    _assert_loaded(job["tensor_2d"])
    # fc1.weight [10, 12] as (Shard(0), Shard(1)) on 2x2: rows 5|5, columns 6|6; the bias replicated whole
    assert [rec["local"]["fc1.weight"] for rec in job["tensor_2d"]] == [[5, 6]] * NPROC
    assert [rec["local"]["fc1.bias"] for rec in job["tensor_2d"]] == [[HIDDEN]] * NPROC
    # fc2.weight [3, 10] as (Shard(1), Shard(0)): columns 5|5 over mesh dim 0, rows 2|1 over mesh dim 1
    assert [rec["local"]["fc2.weight"] for rec in job["tensor_2d"]] == [[2, 5], [1, 5], [2, 5], [1, 5]]


def test_shape_mismatch_on_one_rank_raises_on_every_rank_and_changes_nothing(job):
    records = job["mismatch_on_one_rank"]
    assert [rec["error"] for rec in records] == ["IncompatibleWeightsError"] * NPROC, records
    assert all("fc1.weight" in rec["message"] and "[14, 12]" in rec["message"] for rec in records)
    assert all(any("global rank 1" in n for n in rec["notes"]) for i, rec in enumerate(records) if i != 1)
    assert all(rec["untouched"] for rec in records)  # still on meta everywhere


def test_read_error_on_one_rank_raises_on_every_rank_and_changes_nothing(job):
    records = job["read_error_on_one_rank"]
    assert [rec["error"] for rec in records] == ["CheckpointError"] * NPROC, records
    assert all("injected" in rec["message"] and "model.safetensors" in rec["message"] for rec in records)
    assert all(any("global rank 2" in n for n in rec["notes"]) for i, rec in enumerate(records) if i != 2)
    assert all(rec["untouched"] for rec in records)  # every rank's shards kept their old values


@pytest.mark.parametrize("scenario", ["ddp_unchanged", "plain_unchanged"])
def test_ddp_and_plain_models_load_as_before(job, scenario):
    _assert_loaded(job[scenario])
    assert all(rec["kinds"] == ["Tensor"] for rec in job[scenario])
