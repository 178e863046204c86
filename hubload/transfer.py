"""The transfer engine: one verified, resumable, lock-protected download path for every remote source.

A download streams into the cache's partial file while a writer thread hashes and writes each chunk
(network, hashing and disk overlap: ``hashlib`` and file writes release the GIL). The digest is checked
against the expected sha256 (or prefix) and size, and only then is the file published into ``blobs/``
with one ``os.replace``. Nothing unverified ever appears under ``blobs/`` or ``models/``.

Robustness, in order of what goes wrong in practice:

* a per-target ``flock`` makes N threads/processes pulling the same file do one transfer;
* an interrupted transfer (even SIGKILL) resumes with ``Range`` (+ ``If-Range``); a server that ignores
  the Range (200), answers 416, or whose ETag changed restarts cleanly from byte 0;
* connection errors, timeouts, resets, 5xx and 429 (honouring ``Retry-After``) retry with capped
  exponential backoff and jitter, each retry resuming from the bytes already written; other 4xx fail at once;
  a server nobody answers for (refused, no DNS) before any byte arrived fails fast with ``OfflineError``;
* redirects are followed by hand so ``Authorization`` only ever goes to ``auth_host``;
* large files can be fetched with parallel ranged requests into one preallocated file; each range's progress
  is recorded, so a killed parallel download resumes every range where it stopped.

Resuming in a *new* process re-hashes the partial prefix once (``hashlib`` state cannot be saved);
retries inside one process keep the running hash and never re-read anything.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import http.client
import json
import logging
import os
import queue
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from hubload.cache import Cache, atomic_write_json, cache_os_error
from hubload.errors import (
    CacheError,
    DownloadError,
    HashMismatchError,
    HubloadError,
    ModelNotFoundError,
    OfflineError,
)

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "download", "fetch_range"]

logger = logging.getLogger("hubload")

CHUNK_SIZE = 4 * 1024 * 1024          # bytes read into one buffer before it moves on to write + hash
PIPELINE_BUFFERS = 6                  # buffers in flight in one stream (reading, writing, hashing, spare)
PARALLEL_MIN_SIZE = 64 * 1024 * 1024  # smaller files are not worth several connections
SEGMENT_SIZE = 16 * 1024 * 1024       # smallest unit of work of a parallel download
SEGMENT_MAX = 64 * 1024 * 1024        # largest
CHECKPOINT_SECONDS = 1.0              # record a parallel download's per-range progress this often (and per range)
PROBE_MIN_SIZE = 256 * 1024 * 1024    # files this large start as one stream and split only if it proves slow
PROBE_SECONDS = 0.3                   # how long that first stream is timed
STREAM_FAST = 256 * 1024 * 1024       # bytes/s from which one stream is kept: the client's CPU, not the link, is
                                      # then the limit, and more connections would only compete for it
MAX_REDIRECTS = 10
UNREACHABLE_ATTEMPTS = 2              # connection refused / DNS failure before any byte came: give up this soon
_META_VERSION = 1
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_SECRET_QUERY = re.compile(r"sig|signature|token|key|credential|secret|policy|auth|session", re.I)
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up on a transfer.

    Attributes:
        attempts: Consecutive failed attempts allowed (an attempt that made progress resets the count).
        base_delay: First backoff in seconds; doubles each failure, with jitter.
        max_delay: Cap of one backoff.
        max_retry_after: Cap on a server's ``Retry-After``.
        sleep: The sleep function (tests pass a recorder).
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure.

        Args:
            failures: 1 for the first failure.
            retry_after: The server's ``Retry-After`` in seconds, if any (wins, capped).

        Returns:
            The delay.
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(failures - 1, 0))
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter": spread, but never near zero


DEFAULT_RETRY = RetryPolicy()


class _Transient(Exception):
    """A failure worth retrying (network, 5xx, 429, short/long body)."""

    def __init__(self, message: str, *, retry_after: float | None = None, connect: bool = False,
                 unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.connect = connect  # never got an HTTP response at all
        self.unreachable = unreachable  # refused, no route or no DNS: nothing is listening, waiting rarely helps


class _Restart(Exception):
    """The partial file cannot be continued; start again from byte 0."""


class _NoRanges(Exception):
    """The server does not honour Range: a parallel download must fall back to one stream."""


class _GoParallel(Exception):
    """The probing stream is slow (a per-connection cap): continue from ``state.offset`` with ranges."""


_NETWORK_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)


def _unreachable(exc: BaseException) -> bool:
    """Whether a connection error means nobody answered: refused, no route to the host, or DNS failed."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        # NameResolutionError is a NewConnectionError; a connect *timeout* is not (a slow link may recover).
        if isinstance(cur, (urllib3.exceptions.NewConnectionError, ConnectionRefusedError, socket.gaierror)):
            return True
        if isinstance(cur, urllib3.exceptions.MaxRetryError):
            cur = cur.reason
            continue
        wrapped = cur.args[0] if cur.args and isinstance(cur.args[0], BaseException) else None
        cur = wrapped or cur.__cause__ or cur.__context__
    return False


def redact_url(url: str) -> str:
    """Drop user:password and secret-looking query values from a URL before it is shown anywhere.

    Args:
        url: Any URL.

    Returns:
        The URL safe to log.
    """
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = p.netloc.rsplit("@", 1)[-1]
    query = p.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((p.scheme, netloc, p.path, query, p.fragment))


def _host_port(netloc_or_url: str) -> tuple[str, int | None]:
    """(lowercase host, port or None) of a URL or a bare ``host[:port]``."""
    text = netloc_or_url if "://" in netloc_or_url else f"//{netloc_or_url}"
    p = urlsplit(text)
    return (p.hostname or "").lower(), p.port


def _sends_auth(url: str, auth_host: str) -> bool:
    """Whether ``url`` is on ``auth_host`` (same host and port; no port means the scheme's default)."""
    p = urlsplit(url)
    host, port = (p.hostname or "").lower(), p.port
    default = {"http": 80, "https": 443}.get(p.scheme)
    a_host, a_port = _host_port(auth_host)
    return host == a_host and (port or default) == (a_port or default)


def _retry_after(resp: requests.Response) -> float | None:
    """Parse ``Retry-After`` (seconds or HTTP-date) into seconds."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class _Job:
    """Everything one download needs, so helpers take one argument."""

    url: str
    cache: Cache | None
    sha256: str | None
    size: int | None
    sha256_prefix: str | None
    headers: dict[str, str]
    auth_host: str
    model_id: str
    file: str
    retries: RetryPolicy
    session: requests.Session
    timeout: Any
    key: str = ""
    bar: Any = None

    @property
    def where(self) -> str:
        """``model: file (url)`` for messages; never includes credentials."""
        who = ": ".join(x for x in (self.model_id, self.file) if x)
        return f"{who} ({redact_url(self.url)})" if who else redact_url(self.url)

    @property
    def part(self) -> Path:
        """The partial file."""
        assert self.cache is not None  # noqa: S101 - only downloads (which have a cache) use it
        return self.cache.partial_path(self.key)

    @property
    def meta(self) -> Path:
        """The resume metadata."""
        assert self.cache is not None  # noqa: S101 - see part
        return self.cache.partial_meta_path(self.key)


@dataclass
class _State:
    """Progress of one transfer: the contiguous verified-so-far prefix of the partial file.

    A parallel download also tracks ``segments``: each range's start mapped to the end of what its worker has
    written so far (not yet hashed), so a resumed run continues every range instead of the prefix only.
    """

    offset: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    etag: str | None = None
    resumed_from_disk: int = 0
    preallocated: bool = False
    segments: dict[int, int] | None = None
    received: bool = False  # any byte of the body arrived during this call (the server is reachable)


# ---------------------------------------------------------------------------------------------- HTTP
def _open(job: _Job, extra: Mapping[str, str] | None = None) -> tuple[requests.Response, str]:
    """GET ``job.url`` (streamed), following redirects by hand; Authorization only to ``auth_host``."""
    url = job.url
    for _hop in range(MAX_REDIRECTS + 1):
        headers = {"Accept-Encoding": "identity", **job.headers, **(extra or {})}
        if not _sends_auth(url, job.auth_host):
            # None removes the key after requests merges in session.headers, so a token set on the session
            # does not leak either.
            for k in [k for k in headers if k.lower() == "authorization"]:
                del headers[k]
            headers["Authorization"] = None  # type: ignore[assignment]
        try:
            resp = job.session.get(url, headers=headers, stream=True, allow_redirects=False, timeout=job.timeout)
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader) as exc:
            raise DownloadError(f"{job.where}: invalid request: {exc}.", url=job.url, model_id=job.model_id) from None
        except requests.exceptions.SSLError as exc:
            raise DownloadError(f"{job.where}: TLS error: {exc}. Check the system certificates / proxy.",
                                url=job.url, model_id=job.model_id) from None
        except _NETWORK_ERRORS as exc:
            raise _Transient(f"cannot connect: {type(exc).__name__}: {exc}",
                             connect=isinstance(exc, requests.ConnectionError), unreachable=_unreachable(exc)) from None
        if resp.status_code in _REDIRECT_STATUS and resp.headers.get("Location"):
            nxt = urljoin(url, resp.headers["Location"])
            resp.close()
            if urlsplit(nxt).scheme not in ("http", "https"):
                raise DownloadError(f"{job.where}: refusing redirect to a non-HTTP URL {redact_url(nxt)}.",
                                    url=job.url, model_id=job.model_id)
            logger.debug("hubload: %s redirects to %s", redact_url(url), redact_url(nxt))
            url = nxt
            continue
        _raise_for_status(job, resp)
        return resp, url
    raise DownloadError(f"{job.where}: more than {MAX_REDIRECTS} redirects; the server is misconfigured.",
                        url=job.url, model_id=job.model_id)


def _raise_for_status(job: _Job, resp: requests.Response) -> None:
    """Map an HTTP error status to a retry (5xx/429) or an immediate, explained error."""
    status = resp.status_code
    if status < 400:
        return
    resp.close()
    if status in _RETRY_STATUS or status >= 500:
        raise _Transient(f"HTTP {status} {resp.reason or ''}".strip(), retry_after=_retry_after(resp))
    if status == 416:
        raise _Restart("HTTP 416 (range not satisfiable)")
    if status in (401, 403):
        raise DownloadError(
            f"{job.where}: HTTP {status}: authentication required or access denied. If this is a gated or "
            "private Hugging Face repository, accept its terms on the Hub and set HF_TOKEN (or run "
            "`hf auth login`); otherwise check the credentials for this server.",
            url=job.url, model_id=job.model_id,
        )
    if status in (404, 410):
        raise ModelNotFoundError(
            f"{job.where}: HTTP {status}: the file does not exist at this URL. Check the model ID, "
            "revision and file name in the registry entry.",
            model_id=job.model_id or None,
        )
    raise DownloadError(f"{job.where}: HTTP {status} {resp.reason or ''}; not retrying.".replace(" ;", ";"),
                        url=job.url, model_id=job.model_id)


# ---------------------------------------------------------------------------------------------- resume state
def _write_meta(job: _Job, state: _State, *, durable: bool = True) -> None:
    """Record what the partial file is, so a later process can resume it safely."""
    data: dict[str, Any] = {
        "version": _META_VERSION, "url": redact_url(job.url), "sha256": job.sha256, "size": job.size,
        "etag": state.etag, "bytes_done": state.offset, "preallocated": state.preallocated,
        "model_id": job.model_id, "file": job.file, "updated_at": time.time(),
    }
    if state.preallocated and state.segments:
        # dict() is one atomic copy while range workers keep updating the values.
        data["segments"] = {str(a): w for a, w in dict(state.segments).items()}
    atomic_write_json(job.meta, durable=durable, data=data)


def _load_segments(raw: Any, size: int | None, prefix: int) -> dict[int, int] | None:
    """Validate recorded ``{start: written_end}`` ranges (their sorted starts are the boundaries); None if unusable."""
    if not isinstance(raw, dict) or not raw or size is None:
        return None
    try:
        items = sorted((int(a), int(w)) for a, w in raw.items())
    except (TypeError, ValueError):
        return None
    starts = [a for a, _ in items]
    if starts[0] > prefix:  # bytes between the prefix and the first range would never be fetched
        return None
    segments: dict[int, int] = {}
    for (a, w), b in zip(items, [*starts[1:], size]):
        if not (0 <= a < b and a <= w <= b):
            return None
        segments[a] = w
    return segments


def _segments_from(segments: dict[int, int], offset: int, size: int) -> dict[int, int]:
    """The ranges still to hash from ``offset`` on; the one containing ``offset`` is cut to start there."""
    starts = sorted(segments)
    out: dict[int, int] = {}
    for a, b in zip(starts, [*starts[1:], size]):
        if b <= offset:
            continue
        if a < offset:
            out[offset] = max(segments[a], offset)
        else:
            out[a] = segments[a]
    return out


def _load_state(job: _Job) -> _State:
    """Resume from a previous partial if its metadata matches; otherwise start from 0."""
    state = _State()
    try:
        meta = json.loads(job.meta.read_text(encoding="utf-8"))
        have = job.part.stat().st_size
    except (OSError, ValueError):
        meta, have = None, 0
    ok = (
        isinstance(meta, dict)
        and meta.get("version") == _META_VERSION
        and meta.get("sha256") == job.sha256
        and meta.get("size") == job.size
        # Without a digest, only an ETag (sent as If-Range) tells us the bytes are still the same file.
        and (job.sha256 is not None or bool(meta.get("etag")))
    )
    segments = None
    if ok and meta.get("preallocated"):
        # A parallel run preallocates the file: the hashed prefix it recorded is known good, and each range's
        # recorded written end is on disk too (or, after a power cut, caught by the final digest).
        file_size = have
        have = min(have, int(meta.get("bytes_done") or 0))
        if file_size == job.size:
            segments = _load_segments(meta.get("segments"), job.size, have)
    if not ok or (job.size is not None and have > job.size):
        have, segments = 0, None
    try:
        with open(job.part, "ab") as f:  # create if missing; drop anything past the resume point
            if segments is None:
                f.truncate(have)
    except OSError as exc:
        raise cache_os_error(exc, job.part, "writing") from exc
    if segments is not None and job.size is not None:
        state.segments = _segments_from(segments, have, job.size)
        state.preallocated = True
        in_ranges = sum(w - a for a, w in state.segments.items())
        state.resumed_from_disk = have + in_ranges
        state.etag = meta.get("etag") if isinstance(meta, dict) else None
        if in_ranges:
            logger.info("hubload: resuming %s: %d bytes in order plus %d bytes in %d ranges", job.where, have,
                        in_ranges, len(state.segments))
    if have:
        logger.info("hubload: resuming %s at byte %d (re-hashing the partial prefix once)", job.where, have)
        with open(job.part, "rb", buffering=0) as f:
            buf = bytearray(CHUNK_SIZE)
            view = memoryview(buf)
            left = have
            while left and (n := f.readinto(view[: min(left, len(buf))])):
                state.hasher.update(view[:n])
                left -= n
        state.offset = have
        state.resumed_from_disk = max(state.resumed_from_disk, have)
        state.etag = meta.get("etag") if isinstance(meta, dict) else None
    return state


def _reset(job: _Job, state: _State) -> None:
    """Truncate the partial and forget the hash so far."""
    try:
        with open(job.part, "r+b") as f:
            f.truncate(0)
    except OSError as exc:
        raise cache_os_error(exc, job.part, "writing") from exc
    state.offset = 0
    state.hasher = hashlib.sha256()
    state.resumed_from_disk = 0
    state.preallocated = False
    state.segments = None
    if job.bar is not None:
        job.bar.reset(total=job.size)


def _checkpoint(job: _Job, state: _State) -> None:
    """Record a parallel download's ``bytes_done`` and per-range progress (no fsync: see below).

    A crash can leave the metadata claiming bytes the disk never got; the resumed file then fails
    verification, and the one clean retry from byte 0 in :func:`_transfer` handles it. A SIGKILL loses nothing
    that was written (the page cache survives the process). Syncing every checkpoint cost more than the whole
    transfer on a fast link; one fsync before publish keeps the published blob crash-safe.
    """
    _write_meta(job, state, durable=False)


class _Body:
    """A response body read straight into caller buffers (``recv_into``; no per-chunk ``bytes`` objects).

    For a plain ``Content-Length`` body the socket's buffered reader is read with ``readinto1`` and the length
    is tracked here; anything else (chunked, unknown transports) falls back to urllib3's ``read1`` plus a copy.
    Bytes are never decoded (``Accept-Encoding: identity`` is sent; what arrives is what is hashed).
    """

    def __init__(self, raw: Any) -> None:
        fp = getattr(raw, "_fp", None)  # urllib3 2.x: the http.client.HTTPResponse
        inner = getattr(fp, "fp", None)
        self._raw = raw
        self._inner = inner if (inner is not None and hasattr(inner, "readinto1")
                                and getattr(fp, "chunked", True) is False
                                and isinstance(getattr(fp, "length", None), int)) else None
        self._left = fp.length if self._inner is not None else 0

    def readinto1(self, view: memoryview) -> int:
        """Read what is available (at least one byte, 0 at the end) into ``view``; return the count."""
        if self._inner is not None:
            if self._left <= 0:
                return 0
            n = self._inner.readinto1(view[: min(len(view), self._left)]) or 0
            self._left -= n
            return n
        data = self._raw.read1(len(view), decode_content=False)
        view[: len(data)] = data
        return len(data)

    def fill(self, view: memoryview, deadline: float | None = None) -> int:
        """Read until ``view`` is full, the body ends, or ``deadline`` (monotonic) passes; return the count."""
        got = 0
        while got < len(view):
            n = self.readinto1(view[got:])
            if not n:
                break
            got += n
            if deadline is not None and time.monotonic() >= deadline:
                break
        return got


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    """``os.pwrite`` until every byte is written."""
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n


# ---------------------------------------------------------------------------------------------- one stream
def _stream(job: _Job, state: _State, f: Any, *, probe: bool = False) -> None:
    """One GET from ``state.offset`` to the end, appending to ``f`` and hashing on the way.

    With ``probe``, raise ``_GoParallel`` (everything received so far kept) if the stream runs slower than
    ``STREAM_FAST`` after ``PROBE_SECONDS`` and enough of the file is left to be worth splitting.
    """
    extra = {}
    if state.offset:
        extra["Range"] = f"bytes={state.offset}-"
        if state.etag and not state.etag.startswith("W/"):
            extra["If-Range"] = state.etag
    resp, _final_url = _open(job, extra)
    with resp:
        status = resp.status_code
        etag = resp.headers.get("ETag")
        if status == 200 and state.offset:
            logger.info("hubload: %s ignored the Range request (or the file changed); restarting from 0", job.where)
            _reset(job, state)
            f.seek(0)
        elif status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != state.offset:
                raise _Restart(f"bad Content-Range {resp.headers.get('Content-Range')!r} for offset {state.offset}")
            if state.etag and etag and etag != state.etag:
                raise _Restart("the ETag changed since the partial was written")
            total = None if m.group(3) == "*" else int(m.group(3))
            if job.size is not None and total is not None and total != job.size:
                raise _Transient(f"server reports {total} bytes, expected {job.size}")
        elif status != 200:
            raise DownloadError(f"{job.where}: unexpected HTTP {status}.", url=job.url, model_id=job.model_id)
        if etag != state.etag or state.offset == 0:
            state.etag = etag
            _write_meta(job, state)
        length = resp.headers.get("Content-Length")
        end = state.offset + int(length) if length and length.isdigit() else None
        if job.size is not None and end is not None and end != job.size:
            raise _Transient(f"server announces {end} bytes in all, expected {job.size}")
        _pump(job, state, resp.raw, f, limit=job.size if job.size is not None else end, probe=probe)
    if end is not None and state.offset < end:
        raise _Transient(f"body ended at byte {state.offset} of {end} (truncated)")
    if job.size is not None and state.offset < job.size:
        raise _Transient(f"body ended at byte {state.offset} of {job.size} (truncated)")


def _pump(job: _Job, state: _State, raw: Any, f: Any, *, limit: int | None, probe: bool = False) -> None:
    """Read the body into a ring of buffers; a writer thread writes them and a hashing thread hashes them.

    Three stages overlap (socket reads, ``pwrite``, sha256 all release the GIL) and no chunk is copied in
    Python. ``state.offset``/``state.hasher`` only advance once a chunk is both written and hashed, so after
    an error the retry resumes exactly after the bytes that are on disk and in the hash.
    """
    f.flush()
    fd = f.fileno()
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(PIPELINE_BUFFERS):
        free.put(bytearray(CHUNK_SIZE))
    to_write: queue.Queue[tuple[bytearray, int, int] | None] = queue.Queue()
    to_hash: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    failure: list[BaseException] = []

    def writer() -> None:
        while (item := to_write.get()) is not None:
            buf, pos, n = item
            if not failure:
                try:
                    _pwrite_all(fd, memoryview(buf)[:n], pos)
                except BaseException as exc:  # noqa: BLE001 - handed to the reader thread
                    failure.append(exc)
            if failure:
                free.put(buf)  # keep draining so the reader never blocks on a dead stage
            else:
                to_hash.put((buf, n))
        to_hash.put(None)

    def hasher() -> None:
        while (item := to_hash.get()) is not None:
            buf, n = item
            if not failure:
                try:
                    state.hasher.update(memoryview(buf)[:n])
                    state.offset += n
                    if job.bar is not None:
                        job.bar.update(n)
                except BaseException as exc:  # noqa: BLE001 - handed to the reader thread
                    failure.append(exc)
            free.put(buf)

    threads = [threading.Thread(target=writer, name="hubload-writer", daemon=True),
               threading.Thread(target=hasher, name="hubload-hasher", daemon=True)]
    for t in threads:
        t.start()
    body = _Body(raw)
    received = started_at = state.offset
    t0 = time.monotonic()
    try:
        while not failure:
            buf = free.get()
            # Big chunks on a fast link; on a slow one, hand over at least every 0.25 s so the partial file
            # (what a killed run resumes from, and what lock waiters watch) keeps growing.
            view = memoryview(buf)
            got = 0
            lost: BaseException | None = None
            deadline = time.monotonic() + 0.25
            try:
                while got < len(view):
                    n = body.readinto1(view[got:])
                    if not n:
                        break
                    got += n
                    if time.monotonic() >= deadline:
                        break
            except _NETWORK_ERRORS as exc:
                lost = exc  # bytes that arrived before a reset are kept: the retry resumes after them
            if got and limit is not None and received + got > limit:
                free.put(buf)
                raise _Restart(f"server sent more than the expected {limit} bytes")
            if got:
                state.received = True
                to_write.put((buf, received, got))
                received += got
            else:
                free.put(buf)
            if lost is not None:
                raise _Transient(f"connection lost after {received} bytes: {type(lost).__name__}: {lost}") from None
            if not got:
                break
            if probe and (elapsed := time.monotonic() - t0) >= PROBE_SECONDS:
                probe = False
                rate = (received - started_at) / elapsed
                if rate < STREAM_FAST and limit is not None and limit - received >= PARALLEL_MIN_SIZE:
                    logger.debug("hubload: %s streams at %.0f MB/s; switching to ranged requests", job.where,
                                 rate / 1e6)
                    raise _GoParallel()
    finally:
        to_write.put(None)
        for t in threads:
            t.join()
        if failure:
            exc = failure[0]
            if isinstance(exc, OSError) and not isinstance(exc, HubloadError):
                raise cache_os_error(exc, job.part, "writing") from exc
            raise exc


# ---------------------------------------------------------------------------------------------- parallel ranges
def _parallel(job: _Job, state: _State, f: Any, workers: int) -> None:
    """Fetch ``[state.offset, size)`` with ``workers`` ranged requests into a preallocated file.

    Workers ``pwrite`` their segments; this thread hashes the file in order as contiguous bytes complete,
    re-reading just-written data from the page cache (one memory copy, no disk read in practice) so memory
    stays bounded to one chunk per worker. Raises ``_NoRanges`` if the server ignores Range.

    ``state.segments`` (start -> written end) is the plan: reused as is when resuming (from disk or after a
    retry), so each range continues after its written bytes; the hasher reads every segment from its start,
    which also hashes the bytes an earlier run left in it. The progress is checkpointed about every
    ``CHECKPOINT_SECONDS`` and whenever a range completes.
    """
    if job.size is None:
        raise _NoRanges()
    size = job.size
    fd = f.fileno()
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    except OSError as exc:
        raise cache_os_error(exc, job.part, "preallocating") from exc
    state.preallocated = True
    if state.segments and min(state.segments) <= state.offset:
        state.segments = _segments_from(state.segments, state.offset, size)
    else:
        # Fewer, larger segments on big files (each request costs a round trip and a new connection), but at
        # least 4 per worker so a slow connection cannot hold up the end for long.
        seg = min(max(SEGMENT_SIZE, -(-(size - state.offset) // (workers * 4))), max(SEGMENT_SIZE, SEGMENT_MAX))
        state.segments = {a: a for a in range(state.offset, size, seg)}
    starts = sorted(state.segments)
    segments = list(zip(starts, [*starts[1:], size]))
    _write_meta(job, state)

    done: dict[int, int] = {}  # segment start -> end, once fully written
    landed = [0]  # segments fully written so far; each one triggers a checkpoint
    cond = threading.Condition()
    next_seg = [0]
    errors: list[BaseException] = []
    window = workers * 4  # a worker never runs further ahead of the hasher than this many segments

    def worker() -> None:
        session = requests.Session()
        session.mount("http://", job.session.get_adapter("http://"))
        session.mount("https://", job.session.get_adapter("https://"))
        sub = dataclasses.replace(job, session=session, bar=None)
        try:
            while True:
                with cond:
                    while not errors and next_seg[0] < len(segments) and next_seg[0] - hashed_seg[0] >= window:
                        cond.wait(0.5)
                    if errors or next_seg[0] >= len(segments):
                        return
                    a, b = segments[next_seg[0]]
                    next_seg[0] += 1
                _fetch_segment(sub, state, etag, fd, a, b)
                with cond:
                    done[a] = b
                    landed[0] += 1
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported to the hashing thread
            with cond:
                errors.append(exc)
                cond.notify_all()
        finally:
            session.close()

    hashed_seg = [0]
    etag = [state.etag]  # the first response's ETag binds every other segment to the same file version
    threads = [threading.Thread(target=worker, name=f"hubload-range-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    saved_landed, saved_at = 0, time.monotonic()
    try:
        while state.offset < size:
            with cond:
                if not errors and state.offset not in done:
                    cond.wait(CHECKPOINT_SECONDS / 4)  # wake up now and then to checkpoint a slow download
                ready = state.offset in done
                if errors and not ready:
                    raise errors[0]
                end = done.pop(state.offset) if ready else None
                now_landed = landed[0]
            if end is not None:
                pos = state.offset
                while pos < end:
                    n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos) if hasattr(os, "preadv") else \
                        _pread_into(fd, view[: min(len(buf), end - pos)], pos)
                    if n <= 0:
                        raise _Restart("partial file shorter than written data")
                    state.hasher.update(view[:n])
                    pos += n
                    if job.bar is not None:
                        job.bar.update(n)
                state.offset = end
                with cond:
                    hashed_seg[0] += 1
                    cond.notify_all()
            if now_landed != saved_landed or time.monotonic() - saved_at >= CHECKPOINT_SECONDS:
                state.etag = etag[0]  # the version every recorded byte belongs to, for If-Range on resume
                _checkpoint(job, state)
                saved_landed, saved_at = now_landed, time.monotonic()
        state.etag = etag[0]
    finally:
        with cond:
            if state.offset < size:
                errors.append(_Transient("parallel download interrupted"))
            cond.notify_all()
        for t in threads:
            t.join()


_tls = threading.local()


def _buffer() -> memoryview:
    """This thread's reusable read buffer (a worker fetches many segments; allocate once)."""
    view = getattr(_tls, "view", None)
    if view is None or len(view) != CHUNK_SIZE:
        view = _tls.view = memoryview(bytearray(CHUNK_SIZE))
    return view


def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    """``preadv`` for platforms without it."""
    data = os.pread(fd, len(view), pos)
    view[: len(data)] = data
    return len(data)


def _fetch_segment(job: _Job, state: _State, etag: list[str | None], fd: int, a: int, b: int) -> None:
    """Fetch bytes ``[a, b)`` into the file at ``a``, from ``state.segments[a]`` on; retries resume inside it.

    ``state.segments[a]`` advances after each write, so a checkpoint (or a later run) knows what is on disk.
    """
    view = _buffer()
    pos = min(max(state.segments.get(a, a) if state.segments else a, a), b)
    failures = 0
    while pos < b:
        before = pos
        extra = {"Range": f"bytes={pos}-{b - 1}"}
        if etag[0] and not etag[0].startswith("W/"):
            extra["If-Range"] = etag[0]
        try:
            resp, _ = _open(job, extra)
            with resp:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if resp.status_code != 206 or not m or int(m.group(1)) != pos or int(m.group(2)) != b - 1:
                    raise _NoRanges()
                got = resp.headers.get("ETag")
                if etag[0] is None:
                    etag[0] = got
                elif got and got != etag[0]:
                    raise _Restart("the ETag changed during a parallel download")
                body = _Body(resp.raw)
                try:
                    while pos < b:
                        # On a slow link, write at least every 0.25 s: what is written is what a resume keeps.
                        n = body.fill(view[: min(len(view), b - pos)], deadline=time.monotonic() + 0.25)
                        if not n:
                            raise _Transient(f"range {a}-{b - 1} ended at byte {pos} (truncated)")
                        state.received = True
                        try:
                            _pwrite_all(fd, view[:n], pos)
                        except OSError as exc:
                            raise cache_os_error(exc, job.part, "writing") from exc
                        pos += n
                        if state.segments is not None:
                            state.segments[a] = pos
                except _NETWORK_ERRORS as exc:
                    raise _Transient(f"connection lost in range {a}-{b - 1}: {type(exc).__name__}: {exc}") from None
        except _Transient as exc:
            failures = 1 if pos > before else failures + 1
            # Nothing listening and nothing received yet: let _transfer's short give-up rule decide.
            if failures >= job.retries.attempts or (exc.unreachable and not state.received):
                raise
            job.retries.sleep(job.retries.delay(failures, exc.retry_after))


# ---------------------------------------------------------------------------------------------- the engine
def _transfer(job: _Job, parallel: int) -> Path:
    """Run the download loop under the lock; return the published blob."""
    cache = job.cache
    assert cache is not None  # noqa: S101 - download() always sets it
    cache._mkdir(cache.partial_dir)
    state = _load_state(job)
    failures = 0
    unreachable = 0  # consecutive "nobody is listening" failures before any byte arrived
    restarts = 0
    # Parallel ranges need a digest to check against: without one, segments of two versions of a file that
    # changed mid-download could be spliced together undetected.
    use_parallel = (parallel > 1 and job.size is not None and job.size >= PARALLEL_MIN_SIZE
                    and bool(job.sha256 or job.sha256_prefix))
    # A big file first streams on one connection; if that is fast, ranges would only add CPU work (localhost,
    # LAN); if it is slow (a CDN capping each connection) the rest is split into ranges.
    # A resumed parallel download goes straight back to its ranges.
    probe = use_parallel and job.size is not None and job.size >= PROBE_MIN_SIZE and not state.segments
    if job.bar is not None:
        job.bar.reset(total=job.size)
        job.bar.update(state.offset)
    try:
        f = open(job.part, "r+b")  # noqa: SIM115 - closed in finally, needed across retries
    except OSError as exc:
        raise cache_os_error(exc, job.part, "opening") from exc
    try:
        while True:
            before = state.offset
            try:
                if job.size is None or state.offset < job.size:
                    if use_parallel and not probe:
                        _parallel(job, state, f, parallel)
                    else:
                        if state.preallocated:
                            _drop_ranges(job, state, f)
                        f.seek(state.offset)
                        try:
                            _stream(job, state, f, probe=probe)
                        except _GoParallel:
                            probe = False
                            continue
                f.flush()
                digest = state.hasher.hexdigest()
                if _digest_ok(job, digest):
                    break
                if state.resumed_from_disk and restarts == 0:
                    # The prefix from an earlier run may be damaged (power loss): one clean retry from 0.
                    logger.warning("hubload: %s: resumed file failed verification; downloading it again", job.where)
                    restarts += 1
                    _reset(job, state)
                    continue
                _discard(job, f)
                expected = job.sha256 or f"{job.sha256_prefix}..."
                raise HashMismatchError(
                    f"{job.where}: sha256 mismatch: expected {expected}, got {digest}. The download was "
                    "discarded. If the file changed upstream, update the registry's sha256; otherwise retry.",
                    url=job.url, model_id=job.model_id, expected=job.sha256 or job.sha256_prefix, actual=digest,
                    path=job.file or None,
                )
            except _NoRanges:
                logger.info("hubload: %s does not honour Range; using a single stream", job.where)
                use_parallel = False
                _reset(job, state)
            except _Restart as exc:
                restarts += 1
                logger.info("hubload: %s: %s; restarting from byte 0", job.where, exc)
                if restarts > job.retries.attempts:
                    raise DownloadError(f"{job.where}: gave up after {restarts} restarts ({exc}).",
                                        url=job.url, model_id=job.model_id) from None
                _reset(job, state)
            except _Transient as exc:
                # A flaky link that still makes progress should finish the file, not burn the attempts.
                failures = 1 if state.offset - before >= (1 << 20) else failures + 1
                # Refused / no DNS with no byte ever received: the server is down or the machine offline, and
                # the whole backoff schedule would only make the user wait; once more after a short pause.
                unreachable = unreachable + 1 if exc.unreachable and not state.received else 0
                with suppress(OSError):
                    _write_meta(job, state)
                if unreachable >= UNREACHABLE_ATTEMPTS:
                    kept = " (the partial download is kept for the next attempt)" if state.resumed_from_disk else ""
                    raise OfflineError(
                        f"{job.where}: the server is unreachable ({exc}); gave up after {unreachable} attempts"
                        f"{kept}. Check the network and the server address (HF_ENDPOINT, the registry URL), "
                        "or use offline mode with a cached copy.",
                        url=job.url, model_id=job.model_id) from None
                if failures >= job.retries.attempts:
                    cls = OfflineError if exc.connect and state.offset == 0 else DownloadError
                    hint = ("the server is unreachable; check the network or use offline mode with a "
                            "cached copy" if cls is OfflineError else
                            "run the command again to resume from the bytes already downloaded")
                    raise cls(f"{job.where}: failed after {failures} attempts: {exc}; {hint}.",
                              url=job.url, model_id=job.model_id) from None
                wait = job.retries.delay(unreachable or failures, exc.retry_after)
                logger.info("hubload: %s: %s; retrying in %.1fs (attempt %d of %d)",
                            job.where, exc, wait, failures + 1, job.retries.attempts)
                job.retries.sleep(wait)
        f.close()
        blob = cache.publish(job.part, digest)
        with suppress(FileNotFoundError):
            job.meta.unlink()
        return blob
    finally:
        if not f.closed:
            f.close()


def _drop_ranges(job: _Job, state: _State, f: Any) -> None:
    """Before one stream continues a preallocated file: keep only the hashed prefix, as a stream expects."""
    try:
        f.truncate(state.offset)
    except OSError as exc:
        raise cache_os_error(exc, job.part, "writing") from exc
    state.preallocated = False
    state.segments = None


def _digest_ok(job: _Job, digest: str) -> bool:
    """Compare with the full sha256 or, torch.hub style, a prefix."""
    if job.sha256 is not None:
        return digest == job.sha256
    if job.sha256_prefix:
        return digest.startswith(job.sha256_prefix.lower())
    return True


def _discard(job: _Job, f: Any) -> None:
    """Delete a partial that failed verification, and its metadata."""
    f.close()
    for p in (job.part, job.meta):
        with suppress(FileNotFoundError):
            p.unlink()


def _make_bar(job: _Job, progress: bool | Mapping[str, Any] | None) -> Any:
    """A tqdm bar on stderr, or None; ``disable=None`` switches it off when stderr is not a TTY."""
    if progress is False:
        return None
    from tqdm import tqdm

    kwargs: dict[str, Any] = {
        "total": job.size, "unit": "B", "unit_scale": True, "unit_divisor": 1024, "file": sys.stderr,
        "desc": job.file or os.path.basename(urlsplit(job.url).path) or "download", "disable": None,
        "leave": False,
    }
    if isinstance(progress, Mapping):
        kwargs.update(progress)
    return tqdm(**kwargs)


def download(
    url: str,
    cache: Cache,
    *,
    sha256: str | None,
    size: int | None,
    sha256_prefix: str | None = None,
    headers: Mapping[str, str] | None = None,
    auth_host: str | None = None,
    model_id: str = "",
    file: str = "",
    offline: bool = False,
    progress: bool | Mapping[str, Any] | None = False,
    retries: RetryPolicy = DEFAULT_RETRY,
    parallel: int | None = None,
    session: requests.Session | None = None,
    timeout: float | tuple[float, float] = (10, 60),
    lock_timeout: float | None = 600.0,
) -> Path:
    """Download ``url`` into the cache, verified, and return the blob path.

    A warm hit (``sha256`` given and the blob present with the right size) returns at once: no request,
    no hashing.

    Args:
        url: An http(s) URL (after the source resolved it).
        cache: The cache to publish into.
        sha256: Expected sha256 (lowercase hex); None if unknown (then the blob is named by the digest).
        size: Expected size in bytes, or None.
        sha256_prefix: Accept a digest starting with this (torch.hub ``check_hash`` style) when ``sha256``
            is None.
        headers: Extra request headers (e.g. ``Authorization``, ``User-Agent``). Never logged.
        auth_host: ``host[:port]`` that may receive ``Authorization``; default: the host of ``url``.
            Any redirect to another host (a CDN) drops the header.
        model_id: For messages.
        file: For messages and the progress bar.
        offline: Refuse the network: a miss raises :class:`OfflineError` at once.
        progress: True or None for a tqdm bar on stderr that switches itself off when stderr is not a TTY;
            a dict of tqdm kwargs (e.g. ``{"disable": False}`` to force it); False for none.
        retries: The :class:`RetryPolicy`.
        parallel: Ranged connections for files >= 64 MiB (None/1: one stream).
        session: A ``requests.Session`` to reuse; one is created per call otherwise.
        timeout: ``(connect, read)`` timeout in seconds.
        lock_timeout: Give up waiting for another process downloading the same file after this many seconds
            *without progress* on its partial file (None: wait as long as it lives).

    Returns:
        The path of the verified, read-only blob.

    Raises:
        OfflineError: ``offline`` and not cached, or the server stayed unreachable.
        HashMismatchError: the bytes did not match; nothing was kept.
        ModelNotFoundError: HTTP 404/410.
        DownloadError: other HTTP errors (401/403 say how to authenticate) or retries exhausted.
        CacheError: the cache is read-only or the disk is full.
    """
    if sha256 is not None:
        sha256 = sha256.lower()
        if cache.has_blob(sha256, size):
            return cache.blob_path(sha256)
    who = ": ".join(x for x in (model_id, file) if x) or "file"
    if offline:
        raise OfflineError(
            f"{who} is not in the hubload cache ({cache.root}) and offline mode is on, so {redact_url(url)} "
            "was not fetched. Pull it once while online, or turn offline mode off (unset HUBLOAD_OFFLINE / "
            "HF_HUB_OFFLINE, or pass offline=False).",
            url=url, model_id=model_id or None,
        )
    key = sha256 if sha256 is not None else "url-" + hashlib.sha256(url.encode()).hexdigest()[:40]
    own_session = session is None
    job = _Job(
        url=url, cache=cache, sha256=sha256, size=size, sha256_prefix=sha256_prefix, headers=dict(headers or {}),
        auth_host=auth_host or urlsplit(url).netloc.rsplit("@", 1)[-1], model_id=model_id, file=file,
        retries=retries, session=session or requests.Session(), timeout=timeout, key=key,
    )
    try:
        with cache.lock(key, timeout=lock_timeout, watch=job.part):
            if sha256 is not None and cache.has_blob(sha256, size):  # someone else just finished it
                return cache.blob_path(sha256)
            job.bar = _make_bar(job, progress)
            try:
                return _transfer(job, parallel or 1)
            finally:
                if job.bar is not None:
                    job.bar.close()
    finally:
        if own_session:
            job.session.close()


def fetch_range(
    url: str,
    start: int,
    end: int,
    *,
    headers: Mapping[str, str] | None = None,
    auth_host: str | None = None,
    model_id: str = "",
    file: str = "",
    offline: bool = False,
    retries: RetryPolicy = DEFAULT_RETRY,
    session: requests.Session | None = None,
    timeout: float | tuple[float, float] = (10, 60),
) -> bytes:
    """Read bytes ``[start, end)`` of a remote file (e.g. a safetensors header) without downloading it.

    Same redirect, token and retry rules as :func:`download`. A server that ignores Range is handled by
    reading only up to ``end`` of its full response.

    Args:
        url: An http(s) URL.
        start: First byte (0-based).
        end: One past the last byte, like a slice. Fewer bytes come back if the file is shorter.
        headers: Extra request headers (``Authorization`` only goes to ``auth_host``).
        auth_host: ``host[:port]`` allowed to receive ``Authorization``; default: the host of ``url``.
        model_id: For messages.
        file: For messages.
        offline: Raise :class:`OfflineError` instead of using the network.
        retries: The :class:`RetryPolicy`.
        session: A ``requests.Session`` to reuse.
        timeout: ``(connect, read)`` timeout.

    Returns:
        The bytes.

    Raises:
        OfflineError, DownloadError, ModelNotFoundError: as for :func:`download`.
    """
    if start < 0 or end < start:
        raise ValueError(f"fetch_range: bad byte range [{start}, {end})")
    if end == start:
        return b""
    if offline:
        who = ": ".join(x for x in (model_id, file) if x) or "file"
        raise OfflineError(f"{who}: offline mode is on, so {redact_url(url)} was not read. Turn offline mode "
                           "off, or pull the model while online.", url=url, model_id=model_id or None)
    own_session = session is None
    job = _Job(
        url=url, cache=None, sha256=None, size=None, sha256_prefix=None,
        headers=dict(headers or {}), auth_host=auth_host or urlsplit(url).netloc.rsplit("@", 1)[-1],
        model_id=model_id, file=file, retries=retries, session=session or requests.Session(), timeout=timeout,
    )
    failures = 0
    unreachable = 0
    try:
        while True:
            try:
                return _read_range(job, start, end)
            except _Restart as exc:  # 416: the file is shorter than start
                logger.debug("hubload: range [%d, %d) of %s: %s", start, end, job.where, exc)
                return b""
            except _Transient as exc:
                failures += 1
                unreachable = unreachable + 1 if exc.unreachable else 0  # see _transfer: fail fast when down
                if failures >= retries.attempts or unreachable >= UNREACHABLE_ATTEMPTS:
                    cls = OfflineError if exc.connect else DownloadError
                    hint = (" The server is unreachable; check the network and the server address, or use "
                            "offline mode with a cached copy." if cls is OfflineError else "")
                    raise cls(f"{job.where}: reading bytes {start}-{end - 1} failed after {failures} attempts: "
                              f"{exc}.{hint}", url=url, model_id=model_id or None) from None
                retries.sleep(retries.delay(unreachable or failures, exc.retry_after))
    finally:
        if own_session:
            job.session.close()


def _read_range(job: _Job, start: int, end: int) -> bytes:
    """One ranged GET; tolerate a 200 by skipping to ``start`` in the full body."""
    resp, _ = _open(job, {"Range": f"bytes={start}-{end - 1}"})
    with resp:
        skip = 0
        if resp.status_code == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                raise _Transient(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
        elif resp.status_code == 200:
            skip = start
        else:
            raise DownloadError(f"{job.where}: unexpected HTTP {resp.status_code}.", url=job.url,
                                model_id=job.model_id)
        want = end - start
        out = bytearray()
        try:
            while len(out) < skip + want:
                data = resp.raw.read1(min(CHUNK_SIZE, skip + want - len(out)), decode_content=False)
                if not data:
                    break
                out += data
        except _NETWORK_ERRORS as exc:
            raise _Transient(f"connection lost: {type(exc).__name__}: {exc}") from None
    return bytes(out[skip: skip + want])
