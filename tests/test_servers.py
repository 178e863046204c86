"""The local test servers do what download tests rely on: Range, Hub headers and errors, faults, the log."""

from __future__ import annotations

import hashlib
import http.client
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import requests
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.servers import (
    MINILM_COMMIT,
    MINILM_REPO_ID,
    MINILM_SHA256,
    MINILM_SIZE,
    Fault,
    FileServer,
    HubServer,
)

DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable mod 256
COMMIT = "a" * 40
COMMIT2 = "b" * 40
REPO = "acme/tiny"


def _get(server: FileServer | HubServer, path: str, headers: dict[str, str] | None = None, timeout: float = 10):
    """One GET with http.client; returns (response, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response, response.read()


def _raw_get(server: FileServer, path: str) -> tuple[bytes, bytes]:
    """GET over a bare socket and read until the server closes; returns (head, body) exactly as sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


@pytest.fixture
def data_server(file_server: FileServer) -> FileServer:
    """The file server with DATA at /data.bin."""
    file_server.add("/data.bin", DATA)
    return file_server


# ------------------------------------------------------------------------------------------- file server


def test_get_and_head_send_length_etag_and_keep_alive(data_server: FileServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", data_server.port, timeout=10)
    conn.request("HEAD", "/data.bin")
    head = conn.getresponse()
    assert head.read() == b""
    sock = conn.sock
    conn.request("GET", "/data.bin")
    response = conn.getresponse()
    body = response.read()

    assert conn.sock is sock  # same connection: HTTP/1.1 keep-alive
    assert body == DATA
    assert head.status == response.status == 200
    assert head.getheader("Content-Length") == response.getheader("Content-Length") == str(len(DATA))
    assert response.getheader("ETag") == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert response.getheader("Accept-Ranges") == "bytes"


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [("bytes=100-199", 100, 200), ("bytes=10000-", 10000, len(DATA)), ("bytes=-40", len(DATA) - 40, len(DATA)),
     ("bytes=10000-99999", 10000, len(DATA)), ("bytes=0-0", 0, 1)],
)
def test_single_range_gets_206_with_content_range(
    data_server: FileServer, range_header: str, start: int, end: int
) -> None:
    response, body = _get(data_server, "/data.bin", {"Range": range_header})

    assert response.status == 206
    assert body == DATA[start:end]
    assert response.getheader("Content-Range") == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert response.getheader("Content-Length") == str(end - start)


def test_range_past_the_end_gets_416(data_server: FileServer) -> None:
    response, body = _get(data_server, "/data.bin", {"Range": f"bytes={len(DATA)}-"})

    assert response.status == 416
    assert body == b""
    assert response.getheader("Content-Range") == f"bytes */{len(DATA)}"


def test_multi_range_is_ignored_with_a_full_200(data_server: FileServer) -> None:
    response, body = _get(data_server, "/data.bin", {"Range": "bytes=0-1,5-6"})

    assert (response.status, body) == (200, DATA)


def test_directory_root_serves_files_streamed_and_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "w.bin").write_bytes(DATA)
    (tmp_path / "secret.txt").write_text("no")
    with FileServer(root) as server:
        ok, body = _get(server, "/sub/w.bin", {"Range": "bytes=5-9"})
        escape, _ = _get(server, "/../secret.txt")
        missing, _ = _get(server, "/nope.bin")

    assert (ok.status, body) == (206, DATA[5:10])
    assert escape.status == missing.status == 404


# ------------------------------------------------------------------------------------------------ faults


def test_reset_cuts_the_body_after_k_bytes_with_a_connection_reset(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("reset", after=1000))
    conn = http.client.HTTPConnection("127.0.0.1", data_server.port, timeout=10)
    conn.request("GET", "/data.bin")
    response = conn.getresponse()
    first = response.read(1000)
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        response.read()
    data_server.wait_idle()

    assert first == DATA[:1000]
    assert data_server.requests[-1].bytes_sent == 1000
    assert data_server.requests[-1].fault == "reset"
    assert _get(data_server, "/data.bin")[1] == DATA  # times=1: the next request is healthy


def test_truncate_sends_fewer_bytes_than_content_length(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("truncate", after=3000))
    head, body = _raw_get(data_server, "/data.bin")

    assert f"Content-Length: {len(DATA)}".encode() in head
    assert body == DATA[:3000]


def test_overlong_sends_more_bytes_than_content_length(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("overlong", extra=7))
    head, body = _raw_get(data_server, "/data.bin")

    assert f"Content-Length: {len(DATA)}".encode() in head
    assert len(body) == len(DATA) + 7
    assert body[: len(DATA)] == DATA


def test_wrong_bytes_keeps_the_length_and_corrupts_the_chosen_bytes(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("wrong_bytes", offset=5000, count=3))
    response, body = _get(data_server, "/data.bin")
    differing = [i for i in range(len(DATA)) if body[i] != DATA[i]]

    assert response.status == 200
    assert len(body) == len(DATA)
    assert differing == [5000, 5001, 5002]


def test_wrong_bytes_offset_is_absolute_within_a_range_response(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("wrong_bytes", offset=150))
    _, body = _get(data_server, "/data.bin", {"Range": "bytes=100-199"})

    assert [i + 100 for i in range(100) if body[i] != DATA[100 + i]] == [150]


def test_ignore_range_answers_200_with_the_whole_body(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("ignore_range"))
    response, body = _get(data_server, "/data.bin", {"Range": "bytes=100-"})

    assert (response.status, body) == (200, DATA)
    assert response.getheader("Content-Range") is None


def test_status_burst_then_recovery(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("status", status=500, times=2))
    statuses = [_get(data_server, "/data.bin")[0].status for _ in range(3)]

    assert statuses == [500, 500, 200]


def test_429_carries_retry_after(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("429", retry_after=3))
    response, _ = _get(data_server, "/data.bin")

    assert response.status == 429
    assert response.getheader("Retry-After") == "3"
    assert Fault("rate_limit").kind == "429"


def test_stall_sends_headers_then_hangs(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("stall", after=100, seconds=30))
    conn = http.client.HTTPConnection("127.0.0.1", data_server.port, timeout=0.5)
    conn.request("GET", "/data.bin")
    response = conn.getresponse()
    first = response.read(100)

    assert response.status == 200
    assert first == DATA[:100]
    with pytest.raises(TimeoutError):
        response.read(1)
    conn.close()  # the fixture's stop() wakes the stalled handler, so teardown does not wait 30 s


def test_slow_throttles_to_the_given_rate(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("slow", rate=len(DATA) * 2))  # at least ~0.5 s for the body
    _, body = _get(data_server, "/data.bin")

    assert body == DATA  # throttling must not change the bytes
    data_server.wait_idle()
    # No wall-clock assertion: the log shows the throttled path served the request.
    assert [r.fault for r in data_server.requests] == ["slow"]


def test_redirect_other_host_goes_to_the_alternate_host_without_the_token(data_server: FileServer) -> None:
    data_server.inject("/data.bin", Fault("redirect_other_host"))
    url = data_server.url_for("data.bin")
    response = requests.get(url, headers={"Authorization": "Bearer hf_secret"}, timeout=10)
    first, second = data_server.requests

    assert response.content == DATA
    assert response.history[0].status_code == 302
    assert response.url.startswith(data_server.alt_url)
    assert first.host != second.host
    assert first.authorization == "Bearer hf_secret"
    assert second.authorization is None  # requests drops it across hosts; the log is what shows it


def test_faults_match_methods_paths_and_can_persist_until_cleared(data_server: FileServer) -> None:
    data_server.add("/other.bin", b"x")
    data_server.inject("/data.*", Fault("status", status=503, times=None))

    head = requests.head(data_server.url_for("data.bin"), timeout=10)
    gets = [_get(data_server, "/data.bin")[0].status for _ in range(3)]
    other = _get(data_server, "/other.bin")[0].status
    data_server.clear_faults()
    after = _get(data_server, "/data.bin")[0].status

    assert head.status_code == 200  # default methods=("GET",): the HEAD does not see it
    assert gets == [503, 503, 503]
    assert (other, after) == (200, 200)


def test_global_fault_applies_to_any_path_and_method(data_server: FileServer) -> None:
    data_server.inject(None, Fault("status", status=502, methods=None))

    assert requests.head(data_server.url_for("anything"), timeout=10).status_code == 502
    assert _get(data_server, "/data.bin")[0].status == 200


def test_fault_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")


# ------------------------------------------------------------------------------------------- request log


def test_request_log_records_headers_status_and_bytes(data_server: FileServer) -> None:
    _get(data_server, "/data.bin", {"Range": "bytes=0-9", "Authorization": "Bearer t"})
    requests.head(data_server.url_for("data.bin"), timeout=10)
    _get(data_server, "/missing")
    data_server.wait_idle()
    ranged, head, missing = data_server.requests

    assert (ranged.method, ranged.path, ranged.status, ranged.bytes_sent) == ("GET", "/data.bin", 206, 10)
    assert (ranged.range, ranged.authorization) == ("bytes=0-9", "Bearer t")
    assert ranged.host == f"127.0.0.1:{data_server.port}"
    assert (head.method, head.status, head.bytes_sent) == ("HEAD", 200, 0)
    assert missing.status == 404
    assert data_server.count() == 3
    assert data_server.count("GET") == 2
    assert data_server.count(path="/data.bin") == 2
    assert data_server.count("get", "/data.bin") == 1
    assert data_server.count(host="127.0.0.2") == 0
    data_server.reset_log()
    assert data_server.count() == 0


def test_request_log_is_complete_under_concurrency(data_server: FileServer) -> None:
    def fetch() -> None:
        session = requests.Session()
        for _ in range(5):
            assert session.get(data_server.url_for("data.bin"), timeout=10).content == DATA

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    data_server.wait_idle()

    assert data_server.count("GET", "/data.bin") == 40
    assert sum(r.bytes_sent for r in data_server.requests) == 40 * len(DATA)


def test_stopped_server_refuses_connections(data_server: FileServer) -> None:
    url = data_server.url_for("data.bin")
    data_server.stop()

    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)


# -------------------------------------------------------------------------------------------- hub server


@pytest.fixture
def hub(hub_server: HubServer) -> HubServer:
    """A hub with REPO: weights.bin (LFS) and config.json (git) at COMMIT, sub/x.txt at COMMIT2 (main)."""
    hub_server.add_file(REPO, COMMIT, "weights.bin", DATA, lfs=True)
    hub_server.add_file(REPO, COMMIT, "config.json", b'{"a": 1}', lfs=False)
    hub_server.add_file(REPO, COMMIT2, "sub/x.txt", b"x", lfs=False, branch="main")
    hub_server.add_file(REPO, COMMIT2, "weights.bin", DATA[::-1], lfs=True)
    hub_server.set_branch(REPO, "v1", COMMIT)
    return hub_server


def _git_blob_id(data: bytes) -> str:
    """The git blob id of data, computed by git itself."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    done = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True, check=True)
    return done.stdout.decode().strip()


def test_hf_hub_download_works_against_the_hub(hub: HubServer, tmp_path: Path) -> None:
    weights = hf_hub_download(REPO, "weights.bin", revision=COMMIT, endpoint=hub.url, cache_dir=tmp_path)
    config = hf_hub_download(REPO, "config.json", revision="v1", endpoint=hub.url, cache_dir=tmp_path)
    latest = hf_hub_download(REPO, "weights.bin", endpoint=hub.url, cache_dir=tmp_path)  # main → COMMIT2

    assert Path(weights).read_bytes() == DATA
    assert Path(config).read_bytes() == b'{"a": 1}'
    assert Path(latest).read_bytes() == DATA[::-1]
    assert f"snapshots/{COMMIT}/" in Path(weights).as_posix()
    assert f"snapshots/{COMMIT2}/" in Path(latest).as_posix()


def test_file_metadata_has_commit_etag_and_size(hub: HubServer) -> None:
    lfs = get_hf_file_metadata(hf_hub_url(REPO, "weights.bin", revision="v1", endpoint=hub.url))
    plain = get_hf_file_metadata(hf_hub_url(REPO, "config.json", revision=COMMIT, endpoint=hub.url))

    assert (lfs.commit_hash, lfs.etag, lfs.size) == (COMMIT, hashlib.sha256(DATA).hexdigest(), len(DATA))
    assert (plain.commit_hash, plain.size) == (COMMIT, 8)
    assert plain.etag == _git_blob_id(b'{"a": 1}')


def test_resolve_headers_follow_the_hub(hub: HubServer) -> None:
    response = requests.head(hub.url_for(REPO, COMMIT, "weights.bin"), timeout=10)

    assert response.headers["X-Repo-Commit"] == COMMIT
    assert response.headers["X-Linked-Etag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert response.headers["X-Linked-Size"] == str(len(DATA))
    assert response.headers["ETag"] == response.headers["X-Linked-Etag"]
    assert response.headers["Content-Length"] == str(len(DATA))
    ranged = requests.get(hub.url_for(REPO, COMMIT, "weights.bin"), headers={"Range": "bytes=8-15"}, timeout=10)
    assert (ranged.status_code, ranged.content) == (206, DATA[8:16])


@pytest.mark.parametrize(
    ("repo", "revision", "filename", "error", "code"),
    [
        ("acme/missing", "main", "weights.bin", RepositoryNotFoundError, "RepoNotFound"),
        (REPO, "no-such-branch", "weights.bin", RevisionNotFoundError, "RevisionNotFound"),
        (REPO, COMMIT, "nope.bin", RemoteEntryNotFoundError, "EntryNotFound"),
    ],
)
def test_missing_things_get_the_hub_error_codes(
    hub: HubServer, tmp_path: Path, repo: str, revision: str, filename: str, error: type[Exception], code: str
) -> None:
    raw = requests.head(hub.url_for(repo, revision, filename), timeout=10)

    assert (raw.status_code, raw.headers["X-Error-Code"]) == (404, code)
    with pytest.raises(error):
        hf_hub_download(repo, filename, revision=revision, endpoint=hub.url, cache_dir=tmp_path)


def test_gated_repo_needs_the_token(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_repo("acme/gated", gated=True, token="hf_secret")
    hub_server.add_file("acme/gated", COMMIT, "w.bin", DATA)
    url = hub_server.url_for("acme/gated", "main", "w.bin")

    anonymous = requests.head(url, timeout=10)
    wrong = requests.head(url, headers={"Authorization": "Bearer hf_wrong"}, timeout=10)
    assert (anonymous.status_code, anonymous.headers["X-Error-Code"]) == (401, "GatedRepo")
    assert (wrong.status_code, wrong.headers["X-Error-Code"]) == (403, "GatedRepo")
    with pytest.raises(GatedRepoError):
        hf_hub_download("acme/gated", "w.bin", endpoint=hub_server.url, cache_dir=tmp_path, token=False)
    path = hf_hub_download("acme/gated", "w.bin", endpoint=hub_server.url, cache_dir=tmp_path, token="hf_secret")
    assert Path(path).read_bytes() == DATA


def test_private_repo_looks_missing_without_the_token(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_repo("acme/private", private=True, token="hf_secret")
    hub_server.add_file("acme/private", COMMIT, "w.bin", DATA)

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/private", "w.bin", endpoint=hub_server.url, cache_dir=tmp_path, token=False)
    path = hf_hub_download("acme/private", "w.bin", endpoint=hub_server.url, cache_dir=tmp_path, token="hf_secret")
    assert Path(path).read_bytes() == DATA


def test_cdn_redirect_keeps_the_token_on_the_hub(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_repo("acme/gated", gated=True, token="hf_secret")
    hub_server.add_file("acme/gated", COMMIT, "w.bin", DATA)
    hub_server.redirect_lfs = True

    path = hf_hub_download("acme/gated", "w.bin", endpoint=hub_server.url, cache_dir=tmp_path, token="hf_secret")
    hub_requests = [r for r in hub_server.requests if r.host == f"127.0.0.1:{hub_server.port}"]
    cdn_requests = [r for r in hub_server.requests if r.host != f"127.0.0.1:{hub_server.port}"]

    assert Path(path).read_bytes() == DATA
    assert [r.status for r in hub_requests] == [302]
    assert hub_requests[0].authorization == "Bearer hf_secret"
    assert [(r.method, r.path, r.status) for r in cdn_requests] == [
        ("GET", f"/cdn-lfs/{hashlib.sha256(DATA).hexdigest()}", 200)
    ]
    assert cdn_requests[0].authorization is None


def test_redirect_other_host_fault_on_the_hub_points_at_the_cdn(hub: HubServer) -> None:
    hub.inject(f"/{REPO}/resolve/*/weights.bin", Fault("redirect_other_host", methods=("HEAD",)))
    metadata = get_hf_file_metadata(hf_hub_url(REPO, "weights.bin", revision=COMMIT, endpoint=hub.url))

    assert metadata.location.startswith(hub.alt_url + "/cdn-lfs/")
    assert (metadata.commit_hash, metadata.size) == (COMMIT, len(DATA))


def test_hub_status_fault_surfaces_as_an_http_error(hub: HubServer) -> None:
    hub.inject(None, Fault("status", status=503, methods=None))

    with pytest.raises(HfHubHTTPError) as info:
        get_hf_file_metadata(hf_hub_url(REPO, "weights.bin", revision=COMMIT, endpoint=hub.url))
    assert info.value.response.status_code == 503


def test_model_info_and_tree_apis(hub: HubServer) -> None:
    api = HfApi(endpoint=hub.url)
    info = api.model_info(REPO, revision="v1")
    top = list(api.list_repo_tree(REPO))
    everything = list(api.list_repo_tree(REPO, recursive=True))
    weights = next(s for s in info.siblings if s.rfilename == "weights.bin")

    assert (info.id, info.sha) == (REPO, COMMIT)
    assert sorted(s.rfilename for s in info.siblings) == ["config.json", "weights.bin"]
    assert (weights.lfs.sha256, weights.lfs.size) == (hashlib.sha256(DATA).hexdigest(), len(DATA))
    assert sorted(e.path for e in top) == ["sub", "weights.bin"]
    assert sorted(e.path for e in everything) == ["sub", "sub/x.txt", "weights.bin"]
    config = next(s for s in info.siblings if s.rfilename == "config.json")
    assert config.lfs is None and config.blob_id == _git_blob_id(b'{"a": 1}')


# ------------------------------------------------------------------------------------ the real MiniLM asset


def test_minilm_asset_matches_its_published_digest(minilm_file: Path, minilm_sha256: str) -> None:
    assert minilm_file.stat().st_size == MINILM_SIZE
    assert minilm_sha256 == MINILM_SHA256


def test_minilm_safetensors_metadata_via_range_reads(minilm_hub: HubServer, minilm_file: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    metadata = HfApi(endpoint=minilm_hub.url).get_safetensors_metadata(MINILM_REPO_ID, revision=MINILM_COMMIT)
    with safetensors.safe_open(str(minilm_file), framework="numpy") as f:
        expected = set(f.keys())
    minilm_hub.wait_idle()

    assert set(metadata.files_metadata["model.safetensors"].tensors) == expected
    assert sum(r.bytes_sent for r in minilm_hub.requests) < 1_000_000  # header only, never the whole file


def test_minilm_download_resumes_after_a_truncated_body(
    minilm_hub: HubServer, minilm_sha256: str, tmp_path: Path
) -> None:
    # huggingface_hub writes in 10 MiB chunks and drops a partial one, so cut well past the first chunks.
    minilm_hub.inject("*/model.safetensors", Fault("truncate", after=30_000_000))

    path = hf_hub_download(MINILM_REPO_ID, "model.safetensors", endpoint=minilm_hub.url, cache_dir=tmp_path)
    minilm_hub.wait_idle()
    first, resumed = [r for r in minilm_hub.requests if r.method == "GET"]
    resume_at = int(resumed.range.removeprefix("bytes=").removesuffix("-"))

    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == minilm_sha256
    assert (first.range, first.status, first.bytes_sent) == (None, 200, 30_000_000)
    assert 0 < resume_at <= 30_000_000
    assert (resumed.status, resumed.bytes_sent) == (206, MINILM_SIZE - resume_at)
    assert f"snapshots/{MINILM_COMMIT}/" in Path(path).as_posix()
