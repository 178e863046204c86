"""HTTP plumbing of the transfer engine: one request with hubload's redirect, token, status and retry rules.

What every transfer shares, whichever way it moves the body: :class:`RetryPolicy` (capped exponential
backoff with jitter, ``Retry-After`` honoured), redirects followed by hand so ``Authorization`` only ever
goes to ``auth_host``, HTTP status mapped to a retry or to an explained error, :func:`redact_url` for
anything shown, a zero-copy body reader, and :func:`fetch_range` for reading a few bytes of a remote file
(a safetensors header) without downloading it. ``hubload.transfer`` (one stream) and ``hubload.ranges``
(parallel ranges) build on it.

Named ``httpio`` rather than ``http`` so it is never mistaken for the standard library package.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from hubload.errors import DownloadError, ModelNotFoundError, OfflineError

if TYPE_CHECKING:
    from hubload.cache import Cache

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_RETRY",
    "MAX_REDIRECTS",
    "NETWORK_ERRORS",
    "UNREACHABLE_ATTEMPTS",
    "Body",
    "Job",
    "Restart",
    "RetryPolicy",
    "Transient",
    "content_range",
    "fetch_range",
    "host_gate",
    "open_response",
    "range_headers",
    "redact_url",
]

logger = logging.getLogger("hubload")

CHUNK_SIZE = 4 * 1024 * 1024          # bytes read into one buffer before it moves on to write + hash
MAX_REDIRECTS = 10
UNREACHABLE_ATTEMPTS = 2              # connection refused / DNS failure before any byte came: give up this soon
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


class Transient(Exception):
    """A failure worth retrying (network, 5xx, 429, short/long body); ``retry_after`` is the server's wish."""

    def __init__(self, message: str, *, retry_after: float | None = None, connect: bool = False,
                 unreachable: bool = False, host_url: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.host_url = host_url  # the URL whose host asked for the pause
        self.connect = connect  # never got an HTTP response at all
        self.unreachable = unreachable  # refused, no route or no DNS: nothing is listening, waiting rarely helps


class Restart(Exception):
    """The partial file cannot be continued; start again from byte 0."""


class _HostGate:
    """Per-host throttle shared by every download of the process: a connection cap and a not-before time.

    A 429/503 that asks for a pause (``Retry-After``, ``RateLimit: ...;t=``) pauses every request to that host,
    not only the one that got it: the other range workers would otherwise hit the limit again at once.
    """

    def __init__(self, cap: int) -> None:
        self.slots = threading.BoundedSemaphore(cap)
        self._lock = threading.Lock()
        self._not_before = 0.0
        self._waited = threading.local()

    def defer(self, seconds: float, sleep: Callable[[float], None]) -> None:
        """No new request to this host for ``seconds``; this thread sleeps them now."""
        target = time.monotonic() + seconds
        with self._lock:
            self._not_before = max(self._not_before, target)
        self._waited.until = target
        sleep(seconds)

    def wait(self, sleep: Callable[[float], None]) -> None:
        """Sleep until the host's pause is over (each thread sleeps for one pause only once)."""
        with self._lock:
            target = self._not_before
        if target <= getattr(self._waited, "until", 0.0):
            return
        self._waited.until = target
        left = target - time.monotonic()
        if left > 0:
            sleep(left)


_gates: dict[str, _HostGate] = {}
_gates_lock = threading.Lock()


def host_gate(url: str) -> _HostGate:
    """The throttle of ``url``'s host (``HUBLOAD_MAX_PER_HOST`` connections at once).

    Args:
        url: Any URL of the host.

    Returns:
        Its gate (one per ``host:port`` per process).
    """
    host, port = _host_port(url)
    key = f"{host}:{port or ''}"
    with _gates_lock:
        gate = _gates.get(key)
        if gate is None:
            from hubload.config import max_per_host

            gate = _gates[key] = _HostGate(max_per_host())
        return gate

NETWORK_ERRORS = (
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
    """Seconds the server asks us to wait: ``Retry-After``, else the IETF ``RateLimit`` headers; None if neither.

    ``Retry-After`` is seconds or an HTTP-date. ``RateLimit: "api";r=0;t=2`` (draft-ietf-httpapi-ratelimit-
    headers, what the Hugging Face Hub sends) gives each policy's remaining quota ``r`` and seconds to reset
    ``t``: the wait is the longest ``t`` among exhausted policies (or among all, when none says ``r``).
    ``RateLimit-Policy`` items may carry ``t=`` too; older drafts' ``RateLimit-Reset`` is read last.
    """
    value = (resp.headers.get("Retry-After") or "").strip()
    if value:
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - time.time())
    for name in ("RateLimit", "RateLimit-Policy"):
        wait = _ratelimit_reset(resp.headers.get(name) or "")
        if wait is not None:
            return wait
    reset = (resp.headers.get("RateLimit-Reset") or resp.headers.get("X-RateLimit-Reset") or "").strip()
    if reset.isdigit() and int(reset) < 10**9:  # seconds, not an epoch timestamp
        return float(reset)
    return None


_SF_PARAM = re.compile(r';\s*([a-z*][a-z0-9_.*-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.I)


def _ratelimit_reset(header: str) -> float | None:
    """Seconds to wait from a ``RateLimit`` / ``RateLimit-Policy`` structured-field list, or None."""
    resets: list[tuple[bool, float]] = []  # (exhausted or unknown, t)
    for item in _split_sf_list(header):
        params = {k.lower(): v for k, v in _SF_PARAM.findall(item)}
        t = params.get("t")
        if t is None or not t.replace(".", "", 1).isdigit():
            continue
        r = params.get("r")
        exhausted = r is None or (r.isdigit() and int(r) == 0)
        resets.append((exhausted, float(t)))
    chosen = [t for exhausted, t in resets if exhausted] or [t for _, t in resets]
    return max(chosen) if chosen else None


def _split_sf_list(header: str) -> list[str]:
    """Split a structured-field list on commas outside quoted strings."""
    items, cur, quoted, escaped = [], [], False, False
    for ch in header:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def range_headers(start: int, end: int | None = None, etag: str | None = None) -> dict[str, str]:
    """``Range`` for bytes ``[start, end)`` (to the end of the file without ``end``), plus ``If-Range``.

    ``If-Range`` is sent only for a strong ``etag``: a weak one (``W/...``) is not allowed there.
    """
    headers = {"Range": f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"}
    if etag and not etag.startswith("W/"):
        headers["If-Range"] = etag
    return headers


def content_range(resp: requests.Response, start: int) -> tuple[int, int | None] | None:
    """A 206's ``Content-Range`` as (last byte, total or None for ``*``).

    None if the header is missing, malformed or does not begin at ``start``.
    """
    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if not m or int(m.group(1)) != start:
        return None
    return int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


@dataclass
class Job:
    """Everything one transfer needs, so helpers take one argument (built by ``transfer.download``)."""

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
    part: Path = field(default=Path(), repr=False)   # this writer's partial file (hubload.partial.PartialFile)
    meta: Path = field(default=Path(), repr=False)   # its resume metadata
    beat: Callable[[], None] = field(default=lambda: None, repr=False)  # progress heartbeat of the lock lease

    @property
    def where(self) -> str:
        """``model: file (url)`` for messages; never includes credentials."""
        who = ": ".join(x for x in (self.model_id, self.file) if x)
        return f"{who} ({redact_url(self.url)})" if who else redact_url(self.url)

    def pause(self, seconds: float, exc: Transient | None = None) -> None:
        """Back off before the next attempt. When the server asked for the pause, every request to its host waits."""
        if exc is not None and exc.retry_after is not None and exc.host_url:
            host_gate(exc.host_url).defer(seconds, self.retries.sleep)
        else:
            self.retries.sleep(seconds)


# ---------------------------------------------------------------------------------------------- HTTP
def open_response(job: Job, extra: Mapping[str, str] | None = None) -> tuple[requests.Response, str]:
    """GET ``job.url`` (streamed), following redirects by hand; Authorization only to ``auth_host``.

    Each hop waits for its host's pause (see :func:`host_gate`) and holds one of its connection slots until the
    returned response is closed.

    Args:
        job: The transfer.
        extra: Extra headers (``Range``, ``If-Range``).

    Returns:
        ``(response, final URL)``; close the response (``with resp:``) to free the host's slot.

    Raises:
        Transient: worth retrying (its ``retry_after`` says how long the server wants us to wait).
        Restart: HTTP 416.
        DownloadError, ModelNotFoundError: not worth retrying; the message says why.
    """
    url = job.url
    for _hop in range(MAX_REDIRECTS + 1):
        headers = {"Accept-Encoding": "identity", **job.headers, **(extra or {})}
        if not _sends_auth(url, job.auth_host):
            # None removes the key after requests merges in session.headers, so a token set on the session
            # does not leak either.
            for k in [k for k in headers if k.lower() == "authorization"]:
                del headers[k]
            headers["Authorization"] = None  # type: ignore[assignment]
        gate = host_gate(url)
        gate.wait(job.retries.sleep)
        gate.slots.acquire()
        release = _once(gate.slots.release)
        try:
            try:
                resp = job.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                       timeout=job.timeout)
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader) as exc:
                raise DownloadError(f"{job.where}: invalid request: {exc}.", url=job.url,
                                    model_id=job.model_id) from None
            except requests.exceptions.SSLError as exc:
                raise DownloadError(f"{job.where}: TLS error: {exc}. Check the system certificates / proxy.",
                                    url=job.url, model_id=job.model_id) from None
            except NETWORK_ERRORS as exc:
                raise Transient(f"cannot connect: {type(exc).__name__}: {exc}",
                                connect=isinstance(exc, requests.ConnectionError),
                                unreachable=_unreachable(exc)) from None
            if resp.status_code in _REDIRECT_STATUS and resp.headers.get("Location"):
                nxt = urljoin(url, resp.headers["Location"])
                resp.close()
                release()
                if urlsplit(nxt).scheme not in ("http", "https"):
                    raise DownloadError(f"{job.where}: refusing redirect to a non-HTTP URL {redact_url(nxt)}.",
                                        url=job.url, model_id=job.model_id)
                logger.debug("hubload: %s redirects to %s", redact_url(url), redact_url(nxt))
                url = nxt
                continue
            _raise_for_status(job, resp, url)
        except BaseException:
            release()
            raise
        close = resp.close

        def close_and_release(close: Callable[[], None] = close, release: Callable[[], None] = release) -> None:
            try:
                close()
            finally:
                release()

        resp.close = close_and_release  # type: ignore[method-assign]
        return resp, url
    raise DownloadError(f"{job.where}: more than {MAX_REDIRECTS} redirects; the server is misconfigured.",
                        url=job.url, model_id=job.model_id)


def _once(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` callable many times, run only the first time."""
    done = threading.Lock()

    def run() -> None:
        if done.acquire(blocking=False):
            fn()

    return run


def _raise_for_status(job: Job, resp: requests.Response, url: str) -> None:
    """Map an HTTP error status to a retry (5xx/429) or an immediate, explained error."""
    status = resp.status_code
    if status < 400:
        return
    resp.close()
    if status in _RETRY_STATUS or status >= 500:
        wait = _retry_after(resp)
        what = f"HTTP {status} {resp.reason or ''}".strip()
        if status == 429:
            what += " (rate limited" + (f"; the server asks to wait {wait:g}s)" if wait is not None else ")")
        raise Transient(what, retry_after=wait, host_url=url)
    if status == 416:
        raise Restart("HTTP 416 (range not satisfiable)")
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


class Body:
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
    job = Job(
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
            except Restart as exc:  # 416: the file is shorter than start
                logger.debug("hubload: range [%d, %d) of %s: %s", start, end, job.where, exc)
                return b""
            except Transient as exc:
                failures += 1
                unreachable = unreachable + 1 if exc.unreachable else 0  # see _transfer: fail fast when down
                if failures >= retries.attempts or unreachable >= UNREACHABLE_ATTEMPTS:
                    cls = OfflineError if exc.connect else DownloadError
                    hint = (" The server is unreachable; check the network and the server address, or use "
                            "offline mode with a cached copy." if cls is OfflineError else "")
                    raise cls(f"{job.where}: reading bytes {start}-{end - 1} failed after {failures} attempts: "
                              f"{exc}.{hint}", url=url, model_id=model_id or None) from None
                job.pause(retries.delay(unreachable or failures, exc.retry_after), exc)
    finally:
        if own_session:
            job.session.close()


def _read_range(job: Job, start: int, end: int) -> bytes:
    """One ranged GET; tolerate a 200 by skipping to ``start`` in the full body."""
    resp, _ = open_response(job, range_headers(start, end))
    with resp:
        skip = 0
        if resp.status_code == 206:
            if content_range(resp, start) is None:
                raise Transient(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
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
        except NETWORK_ERRORS as exc:
            raise Transient(f"connection lost: {type(exc).__name__}: {exc}") from None
    return bytes(out[skip: skip + want])
