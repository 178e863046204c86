"""The framework-free half of the public API: what a ``source`` names, ``inspect``, and errors before any framework.

Checkpoints here are written with numpy (``hubload.relayout.write_safetensors``, ``np.savez``); servers are the
local fixtures from ``tests/servers.py``. Nothing here imports torch or TensorFlow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import hubload
from hubload.cache import Cache
from hubload.cli import cli
from hubload.relayout import write_safetensors
from hubload.errors import HubloadError, ModelNotFoundError
from hubload.fetch import pull
from hubload.resolve import resolve_source
from tests.servers import file_sha256

np = pytest.importorskip("numpy")

HEADER_BUDGET = 200_000


@pytest.fixture()
def arrays():
    rng = np.random.default_rng(0)
    # A big tensor, so a full download would be obvious in the server log.
    return {"big.weight": rng.standard_normal((512, 1024)).astype(np.float32),
            "small.bias": np.arange(3, dtype=np.float16),
            "step": np.array(5, dtype=np.int64)}


@pytest.fixture()
def st_file(tmp_path, arrays):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, arrays)
    return path


def _described(tensors) -> dict:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def _expected(arrays) -> dict:
    return {k: (a.shape, str(a.dtype)) for k, a in arrays.items()}


def _blob_files() -> list[Path]:
    blobs = Cache().blobs_dir
    return [p for p in blobs.rglob("*") if p.is_file()] if blobs.exists() else []


# ------------------------------------------------------------------------------------------ source strings


def test_hf_url_parses_repo_revision_and_nested_file():
    art = resolve_source("hf://org/name@v1.0/sub/dir/model.safetensors")
    assert art.label == "hf://org/name@v1.0/sub/dir/model.safetensors"
    assert art.entry.source == "hf://org/name" and art.entry.revision == "v1.0"
    assert [f.path for f in art.entry.files] == ["sub/dir/model.safetensors"]
    assert art.entry.format == "safetensors" and art.layout is None  # the file decides, not a default
    assert resolve_source("hf://org/name/model.safetensors").entry.revision == "main"


def test_url_entries_get_cache_safe_distinct_ids(tmp_path):
    cache = Cache(tmp_path / "c")
    urls = ["hf://org/name@" + "a" * 40 + "/sub/model.safetensors", "hf://org/name/sub/model.safetensors",
            "https://example.org/models/w.safetensors", "https://example.org/other/w.safetensors"]
    ids = [resolve_source(u).entry.id for u in urls]
    assert len(set(ids)) == len(ids)
    for mid in ids:
        cache.snapshot_dir(mid, "main")  # raises CacheError for an ID the cache cannot file


def test_https_url_keeps_sha256_and_unquotes_the_file_name():
    art = resolve_source("https://example.org/m/my%20model.pt", sha256="ab" * 32)
    assert art.entry.source == "https://example.org/m/" and art.entry.format == "torch"
    assert art.entry.files[0].path == "my model.pt" and art.entry.files[0].sha256 == "ab" * 32


def test_file_url_and_pathlike_are_local(st_file):
    art = resolve_source(st_file.as_uri())
    assert art.entry is None and art.path == st_file
    assert resolve_source(st_file).path == st_file


@pytest.mark.parametrize("source,match", [
    ("s3://bucket/w.safetensors", "unsupported scheme"),
    ("hf://org-only", "hf://org/name"),
    ("hf://org/name/../../etc/passwd", "bad file path"),
    ("https://example.org/models/", "names a folder"),
    ("./missing.safetensors", "no such file"),
    ("", "registry ID, URL or path"),
])
def test_bad_sources_are_refused(source, match):
    with pytest.raises(ModelNotFoundError, match=match):
        resolve_source(source)


def test_unknown_id_suggests_close_ids():
    with pytest.raises(ModelNotFoundError, match="Did you mean: seed-mlp") as exc:
        hubload.inspect("seed-mpl")
    assert "seed-mlp" in exc.value.suggestions


def test_id_that_is_also_a_local_path_is_refused(tmp_path, monkeypatch, arrays):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HUBLOAD_OFFLINE", "1")
    registry_view = hubload.inspect("seed-mlp")  # no such file yet: the registry's embedded weights
    assert "dense1.weight" in registry_view
    write_safetensors(tmp_path / "seed-mlp", arrays)
    with pytest.raises(HubloadError, match="both a registry ID and a local path") as exc:
        hubload.inspect("seed-mlp")
    assert "./seed-mlp" in str(exc.value)
    assert _described(hubload.inspect("./seed-mlp")) == _expected(arrays)
    res = CliRunner().invoke(cli, ["inspect", "seed-mlp"])
    assert res.exit_code == 2 and "both a registry ID and a local path" in res.stderr


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_local_safetensors_and_npz(tmp_path, st_file, arrays):
    assert _described(hubload.inspect(str(st_file))) == _expected(arrays)
    np.savez(tmp_path / "w.npz", **arrays)
    assert _described(hubload.inspect(str(tmp_path / "w.npz"))) == _expected(arrays)
    assert hubload.inspect(str(st_file))["big.weight"].nbytes == arrays["big.weight"].nbytes


def test_inspect_https_reads_only_the_header(file_server, st_file, arrays):
    url = file_server.add("/m/w.safetensors", st_file)
    tensors = hubload.inspect(url)
    assert _described(tensors) == _expected(arrays)
    file_server.wait_idle()
    gets = [r for r in file_server.requests if r.method == "GET"]
    assert gets and all(r.range is not None for r in gets)
    assert sum(r.bytes_sent for r in file_server.requests) < min(HEADER_BUDGET, st_file.stat().st_size // 4)
    assert _blob_files() == []


def test_inspect_hf_reads_only_the_header_and_cli_prints_it(hub_server, monkeypatch, st_file, arrays):
    commit = "c" * 40
    hub_server.add_file("org/tiny", commit, "w.safetensors", st_file)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    res = CliRunner().invoke(cli, ["inspect", f"hf://org/tiny@{commit}/w.safetensors", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {r["name"]: (tuple(r["shape"]), r["dtype"], r["bytes"]) for r in rows} == {
        k: (a.shape, str(a.dtype), a.nbytes) for k, a in arrays.items()}
    res = CliRunner().invoke(cli, ["inspect", f"hf://org/tiny@{commit}/w.safetensors"])
    assert res.exit_code == 0
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("big.weight"))
    assert "[512, 1024]" in line and "float32" in line and "2.0 MiB" in line
    assert res.stdout.rstrip().endswith("3 tensors, " + "2.0 MiB")
    hub_server.wait_idle()
    assert all(r.range is not None for r in hub_server.requests if r.method == "GET")
    assert sum(r.bytes_sent for r in hub_server.requests) < HEADER_BUDGET
    assert _blob_files() == []


def test_inspect_remote_non_safetensors_is_pulled_and_verified(file_server, tmp_path, arrays):
    np.savez(tmp_path / "w.npz", **arrays)
    url = file_server.add("/m/w.npz", tmp_path / "w.npz")
    assert _described(hubload.inspect(url)) == _expected(arrays)
    assert [p.name for p in _blob_files()] == [file_sha256(tmp_path / "w.npz")]


def test_inspect_cached_remote_file_makes_no_request(file_server, st_file, arrays):
    url = file_server.add("/m/w.safetensors", st_file)
    sha = file_sha256(st_file)
    reg = {"version": 1, "models": {"tiny": {"source": url.rsplit("/", 1)[0] + "/",
                                             "files": [{"path": "w.safetensors", "sha256": sha}]}}}
    pull("tiny", registry=reg)
    file_server.reset_log()
    assert _described(hubload.inspect("tiny", registry=reg)) == _expected(arrays)
    assert file_server.requests == []


# ------------------------------------------------------------------------------------------ errors before frameworks


def test_weights_need_a_model_or_framework(st_file):
    with pytest.raises(HubloadError, match="needs a model"):
        hubload.load(str(st_file))
    with pytest.raises(HubloadError, match="check needs a model"):
        hubload.check(str(st_file))


def test_num_classes_needs_a_registry_head(st_file):
    with pytest.raises(HubloadError, match="num_classes= needs a registry entry"):
        hubload.load(str(st_file), num_classes=3)


def test_cli_check_unknown_id_exits_2():
    res = CliRunner().invoke(cli, ["check", "seed-mpl", "--framework", "torch"])
    assert res.exit_code == 2
    assert "ModelNotFoundError" in res.stderr and "seed-mlp" in res.stderr


def test_api_paths_import_no_framework(st_file):
    code = (
        "import sys, hubload\n"
        f"t = hubload.inspect({str(st_file)!r})\n"
        "assert 'big.weight' in t\n"
        "try:\n"
        f"    hubload.load({str(st_file)!r})\n"
        "except hubload.HubloadError:\n"
        "    pass\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_exported_functions_survive_submodule_imports():
    code = ("import hubload\n"
            "import hubload.fetch, hubload.relayout, hubload.api, hubload.resolve\n"
            "assert callable(hubload.pull) and callable(hubload.convert), (hubload.pull, hubload.convert)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
