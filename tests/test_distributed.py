"""Scale-out: one pull per node under torch.distributed (torchrun, gloo, CPU) and loading under tf.distribute.

The torchrun tests start the local Hub look-alike in this process, point ``HF_ENDPOINT`` and one shared
``HUBLOAD_CACHE`` at it, run ``examples/torchrun_pull.py`` (or a two-line worker) on four ranks, and read
the server's request log and one ``rank-<N>.json`` per rank. Every subprocess has a bounded timeout: a hang
fails the test instead of the suite.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import pytest

import hubload
from hubload import distributed
from tests.servers import Fault, HubServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "torchrun_pull.py"
SEED_FILE = ROOT / "hubload" / "data" / "seed-mlp" / "model.safetensors"
REPO = "hubload-test/seed-mlp"
COMMIT = "5eed" * 10
CONFIG_JSON = b'{"architectures": ["MLP"], "in_features": 64, "hidden": 64, "num_classes": 10}\n'
NPROC = 4
TIMEOUT = 240  # seconds for a whole torchrun job; it takes ~15 s on 2 busy cores


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_registry(path: Path, files: dict[str, bytes]) -> Path:
    """A registry with one pinned hf:// entry ``dist-mlp`` whose files are ``files`` (name -> bytes)."""
    rows = "\n".join(f"      - {{path: {name}, sha256: {_sha(data)}, size: {len(data)}}}" for name, data in files.items())
    path.write_text(f"""version: 1
models:
  dist-mlp:
    source: hf://{REPO}
    revision: {COMMIT}
    files:
{rows}
    format: safetensors
    layout: torch
    architecture: {{torch: "hubload.zoo.torch_models:mlp"}}
    config: {{in_features: 64, hidden: 64, num_classes: 10}}
""")
    return path


@pytest.fixture
def seed_hub(hub_server: HubServer, tmp_path: Path) -> tuple[HubServer, Path]:
    """The hub serving the seed MLP weights and a config.json, and a registry naming both with their sha256."""
    hub_server.add_file(REPO, COMMIT, "model.safetensors", SEED_FILE, lfs=True)
    hub_server.add_file(REPO, COMMIT, "config.json", CONFIG_JSON, lfs=False)
    files = {"model.safetensors": SEED_FILE.read_bytes(), "config.json": CONFIG_JSON}
    return hub_server, _write_registry(tmp_path / "registry.yaml", files)


def _example_module() -> types.ModuleType:
    """examples/torchrun_pull.py imported as a module (for its digest function)."""
    spec = importlib.util.spec_from_file_location("torchrun_pull", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(script: Path, args: list[str], *, endpoint: str, cache: Path, cwd: Path,
              nproc: int = NPROC) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node N script args`` with a hard timeout (kills the process group).

    ``python -m torch.distributed.run`` is torchrun itself, and needs no console script next to the interpreter.
    """
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HUBLOAD_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), str(script), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT}s (a rank hangs)\nstdout:\n{out}\nstderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _records(out: Path, nproc: int = NPROC) -> list[dict]:
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]


def _per_request(server: HubServer) -> Counter:
    return Counter((r.method, r.path) for r in server.requests)


# ------------------------------------------------------------------------------ torchrun, explicit hook


def test_torchrun_four_ranks_one_transfer_identical_weights(seed_hub, tmp_path):
    server, registry = seed_hub
    out, cache = tmp_path / "out", tmp_path / "shared-cache"
    res = _torchrun(EXAMPLE, ["--model", "dist-mlp", "--registry", str(registry), "--out", str(out)],
                    endpoint=server.url, cache=cache, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    server.wait_idle()

    records = _records(out)
    assert sorted(r["rank"] for r in records) == list(range(NPROC))
    assert {r["local_rank"] for r in records} == set(range(NPROC))
    # The reference: the published file loaded by plain torch in this process.
    from safetensors.torch import load_file

    torch = pytest.importorskip("torch")
    reference = _example_module().state_dict_digest(_module_from(load_file(str(SEED_FILE)), torch))
    assert {r["digest"] for r in records} == {reference}

    per_request = _per_request(server)
    for name in ("model.safetensors", "config.json"):
        gets = [k for k in per_request if k[0] == "GET" and k[1].endswith(f"/{name}")]
        assert len(gets) == 1 and per_request[gets[0]] == 1, per_request
    # Only the leader talked to the hub: every request happened once.
    assert set(per_request.values()) == {1}, per_request
    assert {Path(r["files"]["model.safetensors"]).resolve() for r in records} == \
        {Path(records[0]["files"]["model.safetensors"]).resolve()}


def _module_from(state: dict, torch) -> object:
    """The zoo MLP with ``state`` loaded by torch itself."""
    from hubload.zoo.torch_models import mlp

    model = mlp(in_features=64, hidden=64, num_classes=10)
    model.load_state_dict(state)
    return model


# Four ranks where the issue asks for them; fewer elsewhere to keep the file's run time down on 2 cores.
@pytest.mark.parametrize("fault, error, nproc", [("wrong_bytes", "HashMismatchError", NPROC),
                                                 ("missing", "ModelNotFoundError", 2)])
def test_torchrun_failed_pull_raises_on_every_rank(seed_hub, tmp_path, fault, error, nproc):
    server, registry = seed_hub
    if fault == "wrong_bytes":
        server.inject(f"/{REPO}/resolve/*/model.safetensors", Fault("wrong_bytes", times=None))
    else:  # the registry names a file the hub does not have (404 EntryNotFound)
        files = {"model.safetensors": SEED_FILE.read_bytes(), "config.json": CONFIG_JSON, "extra.bin": b"x" * 10}
        registry = _write_registry(tmp_path / "registry-404.yaml", files)
    out = tmp_path / "out"
    res = _torchrun(EXAMPLE, ["--model", "dist-mlp", "--registry", str(registry), "--out", str(out)],
                    endpoint=server.url, cache=tmp_path / "shared-cache", cwd=tmp_path, nproc=nproc)
    assert res.returncode != 0
    records = _records(out, nproc)
    assert [r.get("error") for r in records] == [error] * nproc, records
    assert all("dist-mlp" in r["message"] for r in records)
    assert not any("digest" in r for r in records)
    server.wait_idle()
    # Only the leader tried: the followers got its error without a request of their own.
    failing = "extra.bin" if fault == "missing" else "model.safetensors"
    tries = [r for r in server.requests if r.path.endswith(f"/{failing}")]
    assert len(tries) == 1, tries
    assert fault == "missing" or not list((tmp_path / "shared-cache").glob(f"blobs/*/{_sha(SEED_FILE.read_bytes())}"))


# ------------------------------------------------------------------- torchrun, hook inside hubload itself

_WORKER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
import hubload

dist.init_process_group("gloo")
mode, registry, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
record = {"rank": dist.get_rank()}
try:
    if mode == "pull":
        hubload.pull("dist-mlp", registry=registry)
    else:
        hubload.load("dist-mlp", framework="torch", registry=registry)
except hubload.HubloadError as exc:
    record["error"] = type(exc).__name__
out.mkdir(parents=True, exist_ok=True)
(out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
"""


# A pinned entry on a healthy hub already moves each file once without the hook (the cache's cross-process
# lock serialises the ranks and the later ones find the blob); what only the hook gives is that a failing
# download is tried once for the node, not once per rank, and reaches every rank.
@pytest.mark.parametrize("mode", ["pull", "load"])
def test_torchrun_plain_pull_and_load_try_a_failing_download_once(seed_hub, tmp_path, mode):
    server, registry = seed_hub
    server.inject(f"/{REPO}/resolve/*/model.safetensors", Fault("wrong_bytes", times=None))
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    res = _torchrun(worker, [mode, str(registry), str(tmp_path / "out")], endpoint=server.url,
                    cache=tmp_path / "shared-cache", cwd=tmp_path, nproc=2)
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r.get("error") for r in _records(tmp_path / "out", 2)] == ["HashMismatchError"] * 2
    server.wait_idle()
    gets = [r for r in server.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    # One transfer for the node (plus, for load, one header pre-check by Range before it), never one per rank.
    assert len([r for r in gets if r.range is None]) == 1, server.requests
    assert len([r for r in gets if r.range is not None]) == (1 if mode == "load" else 0), server.requests


# ------------------------------------------------------------- run_once_per_node logic, with threads as ranks


class _ThreadRanks:
    """A stand-in for ``torch.distributed``: N threads are the ranks, all_gather_object is a barrier."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._barrier = threading.Barrier(world, timeout=20)
        self._slots: list = [None] * world
        self._local = threading.local()
        self.gathers = 0

    # the subset of torch.distributed that hubload.distributed uses
    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return self.world

    def get_rank(self) -> int:
        return self._local.rank

    def all_gather_object(self, out: list, obj: object) -> None:
        self._slots[self._local.rank] = obj
        self._barrier.wait()
        out[:] = list(self._slots)
        if self._local.rank == 0:
            self.gathers += 1
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it

    def run(self, target) -> list:
        """Run ``target(rank)`` on every rank; return each rank's result or exception."""
        results: list = [None] * self.world

        def body(rank: int) -> None:
            self._local.rank = rank
            try:
                results[rank] = target(rank)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                results[rank] = exc

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a rank hangs"
        return results


@pytest.fixture
def ranks(monkeypatch):
    fake = _ThreadRanks(4)
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two "nodes" of two ranks: leaders are ranks 0 and 2
    monkeypatch.delenv("GROUP_RANK", raising=False)
    return fake


def test_no_process_group_just_runs(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch.distributed", raising=False)
    calls = []
    assert distributed.run_once_per_node(lambda: calls.append(1) or "r") == "r"
    assert calls == [1]
    assert not distributed.is_distributed()


def test_leaders_first_then_followers(ranks, monkeypatch):
    # group by the rank's node: GROUP_RANK is per process in real life; here rank // 2 via the node key
    monkeypatch.setattr(distributed, "_node_key", lambda: f"node-{ranks.get_rank() // 2}")
    order: list[int] = []
    lock = threading.Lock()

    def target(rank: int) -> str:
        def fn() -> str:
            with lock:
                order.append(rank)
            return f"result-{rank}"

        return distributed.run_once_per_node(fn, label="m")

    results = ranks.run(target)
    assert results == [f"result-{r}" for r in range(4)]
    assert sorted(order[:2]) == [0, 2] and sorted(order[2:]) == [1, 3]
    assert ranks.gathers == 2


def test_leader_failure_reaches_every_rank_without_running_followers(ranks, monkeypatch):
    monkeypatch.setattr(distributed, "_node_key", lambda: f"node-{ranks.get_rank() // 2}")
    ran: list[int] = []

    def target(rank: int) -> None:
        def fn() -> None:
            ran.append(rank)
            if rank == 2:
                raise hubload.HashMismatchError("model 'm' file 'w': sha256 differs", model_id="m")

        return distributed.run_once_per_node(fn, label="m")

    results = ranks.run(target)
    assert all(isinstance(r, hubload.HashMismatchError) for r in results), results
    assert all(r.model_id == "m" for r in results)
    assert sorted(ran) == [0, 2]  # followers never ran fn
    assert any("global rank 2" in note for note in getattr(results[1], "__notes__", []))


def test_follower_failure_reaches_every_rank(ranks, monkeypatch):
    monkeypatch.setattr(distributed, "_node_key", lambda: "one-node")

    class Odd(Exception):
        def __init__(self, a, b):  # does not survive pickling: sent as text
            super().__init__(f"odd {a} {b}")

    def target(rank: int) -> None:
        def fn() -> str:
            if rank == 3:
                raise Odd(1, 2)
            return "ok"

        return distributed.run_once_per_node(fn, label="m")

    results = ranks.run(target)
    assert isinstance(results[3], Odd)
    for r in results[:3]:
        assert isinstance(r, hubload.HubloadError) and "odd 1 2" in str(r) and "rank 3" in str(r)


def test_nested_calls_are_not_collective(ranks, monkeypatch):
    monkeypatch.setattr(distributed, "_node_key", lambda: "one-node")

    def target(rank: int) -> str:
        inner = lambda: distributed.run_once_per_node(lambda: "inner", label="inner")  # noqa: E731
        return distributed.run_once_per_node(inner, label="outer")

    assert ranks.run(target) == ["inner"] * 4
    assert ranks.gathers == 2  # the outer call's two collectives only


def test_disabled_runs_everywhere(ranks, monkeypatch):
    monkeypatch.setenv("HUBLOAD_DISTRIBUTED", "0")
    assert ranks.run(lambda rank: distributed.run_once_per_node(lambda: rank)) == [0, 1, 2, 3]
    assert ranks.gathers == 0


def test_all_or_nothing_a_failure_before_the_vote_reaches_ranks_waiting_in_agree(ranks):
    committed: list[int] = []

    def target(rank: int) -> None:
        with distributed.all_or_nothing(label="ckpt.safetensors"):
            if rank == 1:  # fails in its check: never reaches agree()
                raise hubload.IncompatibleWeightsError("fc1.weight: [10, 12] vs [14, 12]")
            distributed.agree(None, label="ckpt.safetensors")  # the others vote ok, then would commit
            committed.append(rank)

    results = ranks.run(target)
    assert all(isinstance(r, hubload.IncompatibleWeightsError) and "fc1.weight" in str(r) for r in results), results
    assert committed == []
    assert ranks.gathers == 1  # one vote per rank, wherever it failed


def test_all_or_nothing_non_hubload_error_becomes_hubload_error_elsewhere(ranks):
    def target(rank: int) -> None:
        with distributed.all_or_nothing(label="ckpt"):
            distributed.agree(KeyError("boom") if rank == 3 else None, label="ckpt")

    results = ranks.run(target)
    assert isinstance(results[3], KeyError)
    for r in results[:3]:
        assert isinstance(r, hubload.HubloadError) and "rank 3" in str(r) and "boom" in str(r)


def test_all_or_nothing_votes_ok_for_ranks_that_never_voted(ranks):
    def target(rank: int) -> str:
        with distributed.all_or_nothing(label="x"):
            return "done"

    assert ranks.run(target) == ["done"] * 4
    assert ranks.gathers == 1


def test_agree_single_process_just_raises(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch.distributed", raising=False)
    distributed.agree(None)
    with distributed.all_or_nothing(label="x"):
        pass
    with pytest.raises(hubload.CheckpointError):
        distributed.agree(hubload.CheckpointError("bad"))


def test_local_rank_sources(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch.distributed", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_rank(7) == 3
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.local_rank(7) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert distributed.local_rank(7) == 7


def test_import_does_not_import_torch():
    code = "import sys, hubload.distributed as d; d.run_once_per_node(lambda: 1); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ tf.distribute


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def _strategies(tf):
    return [tf.distribute.MirroredStrategy(["/cpu:0"]), tf.distribute.OneDeviceStrategy("/cpu:0")]


@pytest.mark.parametrize("kind", ["mirrored", "one_device"])
def test_load_inside_strategy_scope_builds_distributed_variables(tf, kind):
    import numpy as np
    from safetensors.numpy import load_file

    strategy = dict(zip(["mirrored", "one_device"], _strategies(tf)))[kind]
    with strategy.scope():
        model, report = hubload.load("seed-mlp", framework="tf", num_classes=3, freeze="backbone",
                                     return_report=True)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert model.distribute_strategy is strategy
    if kind == "mirrored":
        assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in model.weights)
    ckpt = load_file(str(SEED_FILE))
    np.testing.assert_array_equal(model.dense1.kernel.numpy(), ckpt["dense1.weight"].T)
    assert report.replaced == ["dense2.weight", "dense2.bias"]
    rng = np.random.default_rng(0)
    head_before = model.dense2.kernel.numpy().copy()
    model.fit(rng.random((32, 64), dtype=np.float32), rng.integers(0, 3, 32), epochs=1, verbose=0)
    np.testing.assert_array_equal(model.dense1.kernel.numpy(), ckpt["dense1.weight"].T)  # frozen
    assert not np.array_equal(model.dense2.kernel.numpy(), head_before)  # trained


def test_load_with_strategy_argument_enters_its_scope(tf):
    strategy = _strategies(tf)[0]
    model = hubload.load("seed-mlp", framework="tf", strategy=strategy)
    assert model.distribute_strategy is strategy
    assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in model.weights)
