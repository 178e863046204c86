"""Security review (issue 6): tokens never leak and go only to the hub's host; only safe loaders are called;
no registry or archive path escapes the cache.

The token tests capture everything at once: every logger at DEBUG (hubload, urllib3, requests,
huggingface_hub, httpx, httpcore), exception str/repr/tracebacks, CLI stdout/stderr (also with
``HUBLOAD_DEBUG=1``), progress output, and the servers' own request logs (who saw ``Authorization``).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from hubload import transfer
from hubload.cache import Cache
from hubload.errors import CacheError, DownloadError, HubloadError, ModelNotFoundError, RegistryError
from hubload.fetch import pull
from hubload.registry import FileSpec, ModelEntry
from tests.servers import FileServer, HubServer

TOKEN = "hf_SECRETtoken0123456789abcdefXYZ"
COMMIT = "a" * 40
REPO = "acme/private-model"
DATA = os.urandom(300_000)
ROOT = Path(__file__).resolve().parents[1]

_LOGGERS = ("hubload", "urllib3", "requests", "huggingface_hub", "httpx", "httpcore", "filelock")


@pytest.fixture
def all_logs(caplog):
    """Every log record of every relevant logger, at DEBUG."""
    caplog.set_level(logging.DEBUG)
    for name in _LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def _no_token_in_logs(caplog) -> None:
    assert caplog.records, "the capture saw nothing: the test would prove nothing"
    for rec in caplog.records:
        assert TOKEN not in rec.getMessage(), (rec.name, rec.getMessage())
        assert TOKEN not in repr(rec.args), (rec.name, rec.args)
    assert TOKEN not in caplog.text


def _no_token_in_exception(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))  # the whole chain: __cause__ and __context__ too
    assert TOKEN not in text and TOKEN not in repr(exc) and TOKEN not in str(exc)
    for attr in vars(exc).values():
        assert TOKEN not in repr(attr)


def _hub(redirect_lfs: bool = True) -> HubServer:
    hub = HubServer(redirect_lfs=redirect_lfs)
    hub.add_repo(REPO, private=True, token=TOKEN)
    hub.add_file(REPO, COMMIT, "model.safetensors", DATA, lfs=True)
    hub.add_file(REPO, COMMIT, "config.json", b"{}", lfs=False)
    return hub


def _hf_registry(pinned: bool) -> dict:
    files = [{"path": "model.safetensors", **({"sha256": hashlib.sha256(DATA).hexdigest()} if pinned else {})}]
    return {"version": 1, "models": {"priv": {"source": f"hf://{REPO}", "revision": COMMIT if pinned else "main",
                                              "files": files, "format": "safetensors"}}}


def _auth_by_host(server) -> dict[str, set[str | None]]:
    server.wait_idle()
    out: dict[str, set[str | None]] = {}
    for r in server.requests:
        out.setdefault(r.host.split(":")[0], set()).add(r.authorization)
    return out


@pytest.mark.parametrize("pinned", [True, False])
def test_token_goes_only_to_the_hub_never_to_the_cdn_and_never_into_logs(monkeypatch, all_logs, capfd, pinned):
    with _hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        files = pull("priv", registry=_hf_registry(pinned), progress={"disable": False})  # force the bar
        assert files["model.safetensors"].read_bytes() == DATA
        seen = _auth_by_host(hub)
    hub_host = hub.url.split("//")[1].split(":")[0]
    cdn_hosts = set(seen) - {hub_host}
    assert cdn_hosts, f"the CDN redirect was not exercised: {seen}"
    assert seen[hub_host] == {f"Bearer {TOKEN}"}  # the private repo needed it, and got it
    for host in cdn_hosts:
        assert seen[host] == {None}, f"{host} saw Authorization"
    _no_token_in_logs(all_logs)
    out, err = capfd.readouterr()
    assert "model.safetensors" in err or "B/s" in err or "%" in err, "no progress output was captured"
    assert TOKEN not in out and TOKEN not in err


def test_wrong_or_missing_token_errors_do_not_echo_the_token(monkeypatch, all_logs):
    with _hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN + "-wrong")
        with pytest.raises(HubloadError) as ei:
            pull("priv", registry=_hf_registry(False))
        assert isinstance(ei.value, (ModelNotFoundError, DownloadError))
        text = "".join(traceback.format_exception(ei.value))
        assert TOKEN not in text, text  # not even the wrong token (it shares the secret prefix)
        _no_token_in_exception(ei.value)
    _no_token_in_logs(all_logs)


def test_remote_header_precheck_sends_the_token_to_the_hub_only(monkeypatch, all_logs):
    import hubload.api as api

    with _hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        with pytest.raises(HubloadError):  # not a real safetensors file: the pre-check reads its header
            api.inspect(f"hf://{REPO}@{COMMIT}/model.safetensors")
        seen = _auth_by_host(hub)
    hub_host = hub.url.split("//")[1].split(":")[0]
    assert seen[hub_host] == {f"Bearer {TOKEN}"}
    assert all(v == {None} for h, v in seen.items() if h != hub_host), seen
    assert len(seen) == 2, f"the Range requests did not follow the CDN redirect: {seen}"
    _no_token_in_logs(all_logs)


@pytest.mark.parametrize("fn", ["download", "fetch_range"])
def test_file_server_redirect_to_another_host_drops_authorization(tmp_path, all_logs, fn):
    from tests.servers import Fault

    with FileServer({"/w.bin": DATA}) as server:
        server.inject("/w.bin", Fault("redirect_other_host", times=1))
        url = server.url_for("/w.bin")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if fn == "download":
            blob = transfer.download(url, Cache(tmp_path / "c"), sha256=hashlib.sha256(DATA).hexdigest(),
                                     size=len(DATA), headers=headers, progress=False)
            assert blob.read_bytes() == DATA
        else:
            assert transfer.fetch_range(url, 10, 20, headers=headers) == DATA[10:20]
        seen = _auth_by_host(server)
    origin = url.split("//")[1].split(":")[0]
    assert seen[origin] == {f"Bearer {TOKEN}"}
    others = {h: v for h, v in seen.items() if h != origin}
    assert others and all(v == {None} for v in others.values()), seen
    _no_token_in_logs(all_logs)


def test_cli_never_prints_the_token_even_with_debug_tracebacks(tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text(f"version: 1\nmodels:\n  priv:\n    source: hf://{REPO}\n    revision: main\n"
                   "    files: [{path: model.safetensors}]\n")
    with _hub() as hub:
        base = {**os.environ, "HF_ENDPOINT": hub.url}
        runs = [
            ({"HF_TOKEN": TOKEN}, 0),
            ({"HF_TOKEN": TOKEN + "-wrong"}, 2),
            ({"HF_TOKEN": TOKEN + "-wrong", "HUBLOAD_DEBUG": "1"}, 1),
        ]
        for extra, code in runs:
            proc = subprocess.run([sys.executable, "-m", "hubload", "pull", "priv", "--registry", str(reg)],
                                  capture_output=True, text=True, timeout=120, env={**base, **extra})
            assert proc.returncode == code, (extra, proc.returncode, proc.stderr[-2000:])
            assert TOKEN not in proc.stdout and TOKEN not in proc.stderr, proc.stderr
            if "HUBLOAD_DEBUG" in extra:
                assert "Traceback" in proc.stderr  # the debug path really ran


def test_resolved_file_and_job_reprs_hide_the_token(monkeypatch):
    from hubload.sources import resolve_file

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    entry = ModelEntry(id="m", source=f"hf://{REPO}", files=(FileSpec("w.safetensors", "b" * 64),),
                       format="safetensors", revision=COMMIT)
    rf = resolve_file(entry, entry.files[0], token=TOKEN, commit=COMMIT)
    assert rf.headers["authorization"] == f"Bearer {TOKEN}"  # it is there ...
    assert TOKEN not in repr(rf) and TOKEN not in str(rf)  # ... and never shown


def test_redact_url_hides_userinfo_and_signed_query_values():
    url = f"https://user:{TOKEN}@cdn.example.com/x?X-Amz-Signature={TOKEN}&token={TOKEN}&a=1"
    safe = transfer.redact_url(url)
    assert TOKEN not in safe and "a=1" in safe and "cdn.example.com" in safe


# ============================================================================ only safe loaders are called


def _source_files() -> list[Path]:
    files = sorted((ROOT / "hubload").rglob("*.py")) + sorted((ROOT / "adapters").rglob("*.py"))
    assert len(files) > 15, files
    return files


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
        if k.arg is None:  # **kwargs: cannot be verified statically
            return ast.Name("<**kwargs>")
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_every_torch_load_passes_weights_only_true():
    found = []
    for path in _source_files():
        for call, func in _calls(path):
            if func.endswith("torch.load") or func == "load" and "torch" in path.name:
                found.append(f"{path.name}:{call.lineno}")
                assert _is_true(_kw(call, "weights_only")), f"{path}:{call.lineno}: {ast.unparse(call)}"
    assert len(found) >= 2, found  # the zip (mmap) and legacy paths of TorchPickleReader


def test_keras_models_load_only_in_safe_mode():
    found = []
    for path in _source_files():
        for call, func in _calls(path):
            if func.endswith(("load_model", "saving.load_model", "models.load_model")):
                found.append(f"{path.name}:{call.lineno}")
                assert _is_true(_kw(call, "safe_mode")), f"{path}:{call.lineno}: {ast.unparse(call)}"
            assert "enable_unsafe_deserialization" not in func, f"{path}:{call.lineno}"
    assert found, "load_model is no longer called: update this test"


# Reviewed exceptions: (file, call) -> why it is safe.
_ALLOWED = {
    # Status objects between ranks of one torch.distributed job: torch's all_gather_object unpickles them
    # anyway, and peers of one process group already trust each other completely. No file or network input.
    ("hubload/distributed.py", "pickle.loads"),
}


def test_no_unsafe_deserialisers_or_code_execution_in_the_library():
    """pickle, eval/exec, unsafe YAML loaders, np.load(allow_pickle=True), shell=True, unfiltered extractall."""
    problems = []
    for path in _source_files():
        for call, func in _calls(path):
            where = f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)[:120]}"
            if (str(path.relative_to(ROOT)), func) in _ALLOWED:
                continue
            if func in ("eval", "exec", "pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads",
                        "yaml.load", "yaml.unsafe_load", "yaml.full_load", "dill.load", "cloudpickle.load"):
                problems.append(where)
            if func.endswith("np.load") or func == "numpy.load":
                ap = _kw(call, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(where)
            if func.endswith("extractall") or func.endswith(".extract"):
                problems.append(where)  # hubload.archive writes members itself, after checking them
            if func.startswith("subprocess.") and _is_true(_kw(call, "shell")):
                problems.append(where)
            if func == "os.system":
                problems.append(where)
    assert problems == []


def test_yaml_is_parsed_with_a_safe_loader_only():
    text = (ROOT / "hubload" / "_yaml.py").read_text()  # the one module that hands YAML text to PyYAML
    assert "SafeLoader" in text and "yaml.Loader" not in text and "UnsafeLoader" not in text
    assert "FullLoader" not in text
    for module in (ROOT / "hubload").rglob("*.py"):  # and nothing else parses YAML on its own
        other = module.read_text()
        assert module.name == "_yaml.py" or not re.search(r"yaml\.(safe_)?(load|compose|Loader)", other), module


# ==================================================================== no path escapes the cache


@pytest.mark.parametrize("bad", ["../x", "../../etc/passwd", "/etc/passwd", "a/../../x", "a\\..\\x", "C:x", "a//b",
                                 "./a", "a/.", "", "a\x00b"])
def test_cache_link_refuses_traversal(tmp_path, bad):
    cache = Cache(tmp_path / "c")
    sha = hashlib.sha256(b"x").hexdigest()
    tmp = cache.tmp_path(sha)
    tmp.write_bytes(b"x")
    cache.publish(tmp, sha)
    with pytest.raises(CacheError):
        cache.link("m", None, bad, sha)
    assert not (tmp_path / "x").exists() and not (tmp_path / "c" / "x").exists()


def test_cache_link_refuses_a_symlinked_folder_inside_the_snapshot(tmp_path):
    cache = Cache(tmp_path / "c")
    sha = hashlib.sha256(b"x").hexdigest()
    tmp = cache.tmp_path(sha)
    tmp.write_bytes(b"x")
    cache.publish(tmp, sha)
    outside = tmp_path / "outside"
    outside.mkdir()
    snap = cache.snapshot_dir("m", None)
    snap.mkdir(parents=True)
    (snap / "sub").symlink_to(outside, target_is_directory=True)  # a co-tenant planted this
    with pytest.raises(CacheError, match="outside"):
        cache.link("m", None, "sub/w.bin", sha)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("model_id,revision", [("../../evil", None), ("/abs", None), ("a\\b", None),
                                               ("ok", "../../x"), ("ok", "/abs")])
def test_model_ids_and_revisions_cannot_escape_the_cache(tmp_path, model_id, revision):
    cache = Cache(tmp_path / "c")
    with pytest.raises(CacheError):
        cache.snapshot_dir(model_id, revision)


@pytest.mark.parametrize("path", ["../../outside.bin", "/etc/passwd", "a/../../x.bin"])
def test_programmatic_entry_with_a_traversal_path_writes_nothing_outside(tmp_path, path, file_server):
    """An entry built in code (bypassing the YAML parser) still cannot place a file outside the cache."""
    url = file_server.add("/w/x.bin", b"payload")
    entry = ModelEntry(id="m", source=url.rsplit("/", 1)[0] + "/",
                       files=(FileSpec(path, hashlib.sha256(b"payload").hexdigest()),), format="torch")
    from hubload.fetch import pull_entry

    before = set((tmp_path).rglob("*"))
    with pytest.raises((HubloadError, ValueError)):
        pull_entry(entry, cache=Cache(tmp_path / "c"))
    created = {p for p in tmp_path.rglob("*")} - before
    assert all((tmp_path / "c") in p.parents or p == tmp_path / "c" for p in created), created
    assert not Path("/outside.bin").exists()


def test_registry_paths_are_refused_before_any_request(file_server):
    url = file_server.add("/w/x.bin", b"payload")
    reg = {"version": 1, "models": {"m": {"source": url.rsplit("/", 1)[0] + "/",
                                          "files": [{"path": "../x.bin", "sha256": "c" * 64}]}}}
    with pytest.raises(RegistryError, match="escape"):
        pull("m", registry=reg)
    assert file_server.requests == []
