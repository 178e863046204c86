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

__all__ = ["CHUNK_SIZE", "DEFAULT_RETRY", "MAX_REDIRECTS", "UNREACHABLE_ATTEMPTS", "RetryPolicy", "fetch_range",
           "redact_url"]

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


def _range_headers(start: int, end: int | None = None, etag: str | None = None) -> dict[str, str]:
    """``Range`` for bytes ``[start, end)`` (to the end of the file without ``end``), plus ``If-Range``.

    ``If-Range`` is sent only for a strong ``etag``: a weak one (``W/...``) is not allowed there.
    """
    headers = {"Range": f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"}
    if etag and not etag.startswith("W/"):
        headers["If-Range"] = etag
    return headers


def _content_range(resp: requests.Response, start: int) -> tuple[int, int | None] | None:
    """A 206's ``Content-Range`` as (last byte, total or None for ``*``).

    None if the header is missing, malformed or does not begin at ``start``.
    """
    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if not m or int(m.group(1)) != start:
        return None
    return int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


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
    resp, _ = _open(job, _range_headers(start, end))
    with resp:
        skip = 0
        if resp.status_code == 206:
            if _content_range(resp, start) is None:
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
