"""The ``hubload`` command line: issue 2's end-to-end proofs (as real subprocesses) and every command's output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubload.cache import Cache, sha256_file
from hubload.cli import cli
from tests.servers import MINILM_COMMIT, MINILM_SIZE, Fault, HubServer
from tests.test_pull import _data, _sha, published, write_registry

MINILM_PATH = f"/sentence-transformers/all-MiniLM-L6-v2/resolve/{MINILM_COMMIT}/model.safetensors"


def hubload(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m hubload ARGS`` with the test's (isolated) environment plus ``env``."""
    return subprocess.run([sys.executable, "-m", "hubload", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m hubload ARGS`` without waiting."""
    return subprocess.Popen([sys.executable, "-m", "hubload", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def body_bytes(hub: HubServer, path: str = MINILM_PATH) -> int:
    """Body bytes the server sent for ``path``."""
    hub.wait_idle()
    return sum(r.bytes_sent for r in hub.requests if r.method == "GET" and r.path == path)


def one_error_line(stderr: str) -> str:
    """The single line a failing command prints (no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("hubload: error:") or lines[0].startswith("Error:"), lines[0]
    return lines[0]


@pytest.fixture
def cache() -> Cache:
    return Cache(os.environ["HUBLOAD_CACHE"])


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# ------------------------------------------------------------------------------ issue 2 "Done when" (real processes)


def test_pull_builtin_entry_downloads_verifies_and_the_second_pull_makes_zero_requests(
        minilm_hub, minilm_sha256, cache) -> None:
    env = {"HF_ENDPOINT": minilm_hub.url}
    first = hubload("pull", "all-minilm-l6-v2", "--json", env=env)
    assert first.returncode == 0, first.stderr
    [item] = json.loads(first.stdout)
    [f] = item["files"]
    assert f["sha256"] == minilm_sha256 and f["size"] == MINILM_SIZE and f["verified"] == "sha256"
    assert sha256_file(f["local"]) == minilm_sha256  # re-hash here, independently of hubload
    assert body_bytes(minilm_hub) == MINILM_SIZE

    minilm_hub.reset_log()
    second = hubload("pull", "all-minilm-l6-v2", env=env)
    assert second.returncode == 0, second.stderr
    assert f["local"] in second.stdout and "sha256 ok" in second.stdout
    assert minilm_hub.requests == []


def _kill_when_sent(proc: subprocess.Popen, hub: HubServer, nbytes: int) -> None:
    """SIGKILL ``proc`` once the server has sent ``nbytes`` of the file."""
    deadline = time.monotonic() + 60
    while sum(r.bytes_sent for r in hub.requests if r.method == "GET") < nbytes:
        assert proc.poll() is None, f"the pull ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "the transfer did not progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("parallel", [
    "1",
    None,
], ids=["single-stream", "default-parallel"])
def test_pull_killed_half_way_resumes_with_a_range_request_and_verifies(
        minilm_hub, minilm_sha256, cache, parallel) -> None:
    env = {"HF_ENDPOINT": minilm_hub.url}
    extra = ["--parallel", parallel] if parallel else []
    minilm_hub.inject(None, Fault("slow", times=None, rate=12 << 20))
    proc = spawn("pull", "all-minilm-l6-v2", *extra, env=env)
    _kill_when_sent(proc, minilm_hub, MINILM_SIZE // 2)
    assert proc.returncode == -signal.SIGKILL
    assert published(cache) == []  # nothing half-done is visible to readers

    minilm_hub.clear_faults()
    minilm_hub.wait_idle()
    minilm_hub.reset_log()
    done = hubload("pull", "all-minilm-l6-v2", "--json", *extra, env=env)
    assert done.returncode == 0, done.stderr
    gets = [r for r in minilm_hub.requests if r.method == "GET"]
    starts = [int(r.range.split("=")[1].split("-")[0]) for r in gets if r.range]
    assert starts and min(starts) > 0, f"no resume: {[r.range for r in gets]}"
    assert body_bytes(minilm_hub) <= MINILM_SIZE * 3 // 4, "the resumed pull downloaded (almost) everything again"
    [item] = json.loads(done.stdout)
    assert sha256_file(item["files"][0]["local"]) == minilm_sha256


def test_six_concurrent_pulls_transfer_the_file_once_and_all_succeed(minilm_hub, minilm_sha256, cache) -> None:
    env = {"HF_ENDPOINT": minilm_hub.url}
    minilm_hub.inject(None, Fault("slow", times=None, rate=16 << 20))  # long enough for all six to overlap
    procs = [spawn("pull", "all-minilm-l6-v2", "--json", env=env) for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in outs]
    reports = [json.loads(out)[0]["files"][0] for out, _ in outs]
    assert {r["local"] for r in reports} == {reports[0]["local"]}
    assert {r["sha256"] for r in reports} == {minilm_sha256}
    assert body_bytes(minilm_hub) == MINILM_SIZE  # one transfer: every byte sent exactly once
    ranges = sorted(r.range for r in minilm_hub.requests if r.method == "GET")
    assert len(ranges) == len(set(ranges))
    assert sha256_file(reports[0]["local"]) == minilm_sha256


def test_wrong_bytes_leave_nothing_in_the_cache_and_name_both_digests(minilm_hub, minilm_sha256, cache) -> None:
    minilm_hub.inject(None, Fault("wrong_bytes", times=None))
    res = hubload("pull", "all-minilm-l6-v2", env={"HF_ENDPOINT": minilm_hub.url})
    assert res.returncode != 0
    line = one_error_line(res.stderr)
    assert "HashMismatchError" in line and minilm_sha256 in line
    actual = [w.strip(".,;") for w in line.split() if len(w.strip(".,;")) == 64 and w.strip(".,;") != minilm_sha256]
    assert actual, f"the actual digest is not named: {line}"
    assert published(cache) == []
    assert cache.read_ref("all-minilm-l6-v2") is None
    assert not list(cache.partial_dir.glob("*.part")) if cache.partial_dir.exists() else True


# ------------------------------------------------------------------------------ commands


def _local_registry(tmp_path: Path, name: str = "r.yaml", *, mid: str = "tiny", seed: int = 0,
                    size: int = 30_000) -> tuple[Path, bytes]:
    data = _data(size, seed=seed)
    folder = tmp_path / f"src-{mid}-{seed}"
    folder.mkdir(exist_ok=True)
    (folder / "w.safetensors").write_bytes(data)
    reg = write_registry(tmp_path / name, {mid: {
        "source": folder.name, "description": f"test model {mid}",
        "files": [{"path": "w.safetensors", "sha256": _sha(data), "size": len(data)}]}})
    return reg, data


def test_python_m_hubload_help() -> None:
    res = subprocess.run([sys.executable, "-m", "hubload", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for cmd in ("pull", "list", "info", "verify", "cache"):
        assert cmd in res.stdout


def test_registry_layering_through_the_cli(runner, tmp_path, monkeypatch) -> None:
    top, _ = _local_registry(tmp_path, "top.yaml", mid="tiny", seed=1)
    env_reg, _ = _local_registry(tmp_path, "env.yaml", mid="tiny", seed=2)
    other, _ = _local_registry(tmp_path, "other.yaml", mid="only-env", seed=3)
    monkeypatch.setenv("HUBLOAD_REGISTRY", os.pathsep.join([str(env_reg), str(other)]))

    res = runner.invoke(cli, ["list", "--json"])
    assert res.exit_code == 0, res.output
    ids = {r["id"] for r in json.loads(res.stdout)}
    assert {"tiny", "only-env", "all-minilm-l6-v2"} <= ids  # HUBLOAD_REGISTRY adds over the built-in ones

    info = json.loads(runner.invoke(cli, ["info", "tiny", "--json"]).stdout)
    assert info["registry_file"] == str(env_reg)
    info = json.loads(runner.invoke(cli, ["info", "tiny", "--json", "--registry", str(top)]).stdout)
    assert info["registry_file"] == str(top)  # --registry wins over HUBLOAD_REGISTRY

    text = runner.invoke(cli, ["list"]).stdout
    assert "only-env" in text and "test model only-env" in text


def test_info_flags_a_prefix_only_file_as_weakly_pinned(runner, tmp_path) -> None:
    reg = write_registry(tmp_path / "r.yaml", {"prefixed": {
        "source": "https://example.invalid/m/", "format": "torch",
        "files": [{"path": "w-1234abcd.pth", "sha256_prefix": "1234abcd"}]}})
    res = runner.invoke(cli, ["info", "prefixed", "--registry", str(reg)])
    assert res.exit_code == 0, res.output
    assert "WEAKLY PINNED" in res.stdout and "prefix only" in res.stdout
    data = json.loads(runner.invoke(cli, ["info", "prefixed", "--registry", str(reg), "--json"]).stdout)
    assert data["weakly_pinned"] is True and data["pinned"] is False and data["cached"] is False
    pinned = json.loads(runner.invoke(cli, ["info", "all-minilm-l6-v2", "--json"]).stdout)
    assert pinned["pinned"] is True and pinned["weakly_pinned"] is False


def test_pull_json_then_verify_evicts_a_corrupted_blob_and_exits_1(runner, tmp_path, cache) -> None:
    reg, data = _local_registry(tmp_path)
    res = runner.invoke(cli, ["pull", "tiny", "--registry", str(reg), "--json"])
    assert res.exit_code == 0, res.output
    local = Path(json.loads(res.stdout)[0]["files"][0]["local"])
    assert local.read_bytes() == data

    ok = runner.invoke(cli, ["verify", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True

    blob = local.resolve()
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"\x00\x01")
    bad = runner.invoke(cli, ["verify", "tiny", "--registry", str(reg), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and report["files"][0]["status"] == "corrupt"
    assert report["files"][0]["actual"] == _sha(b"\x00\x01" + data[2:])
    assert not blob.exists()
    text = runner.invoke(cli, ["verify"])
    assert text.exit_code == 0  # the corrupt blob is gone, nothing bad remains

    again = runner.invoke(cli, ["pull", "tiny", "--registry", str(reg)])
    assert again.exit_code == 0 and local.read_bytes() == data


def test_cache_ls_rm_prune(runner, tmp_path, cache) -> None:
    reg, data = _local_registry(tmp_path)
    assert runner.invoke(cli, ["pull", "tiny", "--registry", str(reg)]).exit_code == 0
    ls = json.loads(runner.invoke(cli, ["cache", "ls", "--json"]).stdout)
    assert ls["root"] == str(cache.root)
    [m] = ls["models"]
    assert m["id"] == "tiny" and m["complete"] and m["size"] == len(data)
    assert "tiny" in runner.invoke(cli, ["cache", "ls"]).stdout

    # An orphan blob older than the prune grace period is removed; the model's blob is kept.
    orphan = b"orphan bytes"
    tmp = cache.tmp_path("orphan")
    tmp.write_bytes(orphan)
    orphan_blob = cache.publish(tmp, _sha(orphan))
    os.utime(orphan_blob, (time.time() - 7200, time.time() - 7200), follow_symlinks=False)
    res = runner.invoke(cli, ["cache", "prune"])
    assert res.exit_code == 0 and "pruned" in res.stdout
    assert not orphan_blob.exists() and cache.has_blob(_sha(data))

    rm = runner.invoke(cli, ["cache", "rm", "tiny"])
    assert rm.exit_code == 0 and "removed tiny" in rm.stdout
    assert json.loads(runner.invoke(cli, ["cache", "ls", "--json"]).stdout)["models"] == []
    assert not cache.has_blob(_sha(data))

    missing = runner.invoke(cli, ["cache", "rm", "tiny"])
    assert missing.exit_code != 0 and "not in the cache" in missing.stderr


def test_errors_are_one_line_with_a_traceback_only_in_debug_mode(tmp_path) -> None:
    res = hubload("pull", "all-minilm-l6-v3")
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "ModelNotFoundError" in line and "all-minilm-l6-v2" in line  # suggests the close ID

    debug = hubload("pull", "all-minilm-l6-v3", env={"HUBLOAD_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmodels:\n  x:\n    source: hf://a/b\n    filez: []\n", encoding="utf-8")
    res = hubload("list", "--registry", str(broken))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "RegistryError" in line and str(broken) in line and "filez" in line


def test_offline_miss_is_one_clear_line(runner, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens; offline must not even try
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")
    res = runner.invoke(cli, ["pull", "all-minilm-l6-v2"])
    assert res.exit_code == 2
    assert "OfflineError" in res.stderr and "all-minilm-l6-v2" in res.stderr
    monkeypatch.delenv("HUBLOAD_OFFLINE")
    res = runner.invoke(cli, ["pull", "all-minilm-l6-v2", "--offline"])
    assert res.exit_code == 2 and "OfflineError" in res.stderr


def test_cached_pinned_entry_pulls_offline(runner, tmp_path, monkeypatch) -> None:
    reg, data = _local_registry(tmp_path)
    assert runner.invoke(cli, ["pull", "tiny", "--registry", str(reg)]).exit_code == 0
    (tmp_path / "src-tiny-0" / "w.safetensors").unlink()  # the source is gone; the cache must answer
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")
    res = runner.invoke(cli, ["pull", "tiny", "--registry", str(reg), "--json"])
    assert res.exit_code == 0, res.output
    assert Path(json.loads(res.stdout)[0]["files"][0]["local"]).read_bytes() == data


def test_token_never_appears_in_cli_output(tmp_path) -> None:
    token = "hf_CliSecretToken9876543210"
    data = _data(70_000, seed=21)
    hub = HubServer(redirect_lfs=True)
    hub.add_repo("acme/gated", gated=True, token=token)
    hub.add_file("acme/gated", "b" * 40, "w.safetensors", data)
    reg = write_registry(tmp_path / "r.yaml", {"gated": {
        "source": "hf://acme/gated", "revision": "main", "files": [{"path": "w.safetensors"}]}})
    with hub:
        env = {"HF_ENDPOINT": hub.url, "HUBLOAD_DEBUG": "1"}
        bad = hubload("pull", "gated", "--registry", str(reg), env={**env, "HF_TOKEN": token + "x"})
        good = hubload("pull", "gated", "--registry", str(reg), "--json", env={**env, "HF_TOKEN": token})
        hub.wait_idle()
    assert bad.returncode != 0 and good.returncode == 0, good.stderr
    for out in (bad.stdout, bad.stderr, good.stdout, good.stderr):
        assert token not in out
    hub_host = hub.url.split("//")[1]
    assert all(r.authorization is None for r in hub.requests if not r.host.startswith(hub_host))


def test_pull_prefer_cache_serves_the_cache_with_zero_requests_and_downloads_only_what_is_missing(
        hub_server, runner, tmp_path, monkeypatch) -> None:
    cached, missing = _data(40_000, seed=31), _data(45_000, seed=32)
    repo, commit = "acme/prefer-tiny", "c" * 40
    hub_server.add_file(repo, commit, "a.safetensors", cached)
    hub_server.add_file(repo, commit, "b.safetensors", missing)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    reg = write_registry(tmp_path / "r.yaml", {
        "floating": {"source": f"hf://{repo}", "revision": "main", "files": [{"path": "a.safetensors"}]},
        "other": {"source": f"hf://{repo}", "revision": "main", "files": [{"path": "b.safetensors"}]},
    })
    assert runner.invoke(cli, ["pull", "floating", "--registry", str(reg)]).exit_code == 0
    hub_server.wait_idle()
    hub_server.reset_log()
    res = runner.invoke(cli, ["pull", "floating", "--registry", str(reg), "--prefer-cache", "--json"])
    assert res.exit_code == 0, res.output
    assert Path(json.loads(res.stdout)[0]["files"][0]["local"]).read_bytes() == cached
    hub_server.wait_idle()
    assert hub_server.requests == []  # a cached entry on a branch is not even re-resolved
    res = runner.invoke(cli, ["pull", "other", "--registry", str(reg), "--prefer-cache", "--json"])
    assert res.exit_code == 0, res.output
    assert Path(json.loads(res.stdout)[0]["files"][0]["local"]).read_bytes() == missing
    hub_server.wait_idle()
    assert hub_server.requests != []  # what was missing came from the network


def test_pull_offline_and_prefer_cache_together_is_a_usage_error(runner, tmp_path) -> None:
    reg, _ = _local_registry(tmp_path)
    res = runner.invoke(cli, ["pull", "tiny", "--registry", str(reg), "--offline", "--prefer-cache"])
    assert res.exit_code == 2
    line = one_error_line(res.stderr)
    assert "UsageError" in line and "--offline" in line and "--prefer-cache" in line
    assert "unexpected" not in line
