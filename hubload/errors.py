"""The exceptions hubload raises: one tree, rooted at :class:`HubloadError`.

    HubloadError
    ├── RegistryError (ValueError)            bad registry file or entry
    ├── ModelNotFoundError (LookupError)      unknown model ID / missing file in a repo
    │   └── NoWeightsError                    a Hub repo holds no weight file hubload can load
    ├── DownloadError (OSError)               a transfer failed
    │   ├── HashMismatchError                 bytes did not match the expected sha256
    │   ├── AccessDeniedError                 a gated or private repo, and no (valid) token
    │   └── OfflineError                      a miss while offline (or the server is unreachable)
    ├── CacheError (OSError)                  the cache dir is unusable (read-only, full, corrupt)
    ├── CheckpointError (ValueError)          a checkpoint file is malformed or unreadable
    │   └── UnsafeCheckpointError             a checkpoint needs code execution to load
    │       └── UnsafeArchiveError            an archive member escapes its folder, is a link, or a bomb
    ├── IncompatibleWeightsError (ValueError) checkpoint and model do not fit (carries the report)
    ├── MissingDependencyError (ImportError)  an optional framework/extra is not installed
    └── UsageError (ValueError)               bad arguments or a bad combination of them (raised up front)

Every error survives a pickle round trip with its type, message and attributes (errors cross
torch.distributed ranks and process pools).

Every message names the model ID, file or URL involved and says what to do next.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccessDeniedError",
    "CacheError",
    "CheckpointError",
    "DownloadError",
    "HashMismatchError",
    "HubloadError",
    "IncompatibleWeightsError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "NoWeightsError",
    "OfflineError",
    "RegistryError",
    "UnsafeArchiveError",
    "UnsafeCheckpointError",
    "UsageError",
]


def _rebuild_error(cls: type, args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """Unpickle a hubload error without calling its ``__init__`` (whose keywords differ per class)."""
    exc = cls.__new__(cls)
    BaseException.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class HubloadError(Exception):
    """Base class of every error hubload raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # The default re-calls cls(*self.args), which breaks every subclass with keyword-only or extra
        # constructor arguments (MissingDependencyError, UnsafeArchiveError ...): keep args and attributes.
        return _rebuild_error, (type(self), self.args, dict(self.__dict__))


class _MessageOnlyError(HubloadError):
    """``str(exc)`` is the message alone: not LookupError's repr() of it, nor OSError's errno formatting."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RegistryError(HubloadError, ValueError):
    """A registry file or entry is invalid.

    Attributes:
        file: The registry file, if known.
        entry: The model ID of the entry, if known.
        field: The offending field, if known.
        line: The 1-based YAML line, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        entry: str | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.entry = entry
        self.field = field
        self.line = line
        where = []
        if file:
            where.append(f"{file}:{line}" if line else str(file))
        if entry:
            where.append(f"model {entry!r}")
        if field:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelNotFoundError(_MessageOnlyError, LookupError):
    """A model ID is not in any registry, or a file/repo/revision does not exist upstream."""

    def __init__(self, message: str, *, model_id: str | None = None, suggestions: list[str] | None = None) -> None:
        self.model_id = model_id
        self.suggestions = list(suggestions or [])
        super().__init__(message)


class NoWeightsError(ModelNotFoundError):
    """A Hub repository exists but holds no weight file hubload can pin and load."""


class DownloadError(_MessageOnlyError, OSError):
    """A transfer failed (network, HTTP status, or the server misbehaved)."""

    def __init__(self, message: str, *, url: str | None = None, model_id: str | None = None) -> None:
        self.url = url
        self.model_id = model_id
        super().__init__(message)


class HashMismatchError(DownloadError):
    """Downloaded bytes do not match the expected sha256; nothing was kept."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        model_id: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
        path: str | None = None,
    ) -> None:
        self.expected = expected
        self.actual = actual
        self.path = path
        super().__init__(message, url=url, model_id=model_id)


class AccessDeniedError(DownloadError):
    """A gated or private repository refused the request: no token, or one without access (never shown)."""


class OfflineError(DownloadError):
    """A file is not cached and hubload may not (or cannot) reach the network."""


class CacheError(_MessageOnlyError, OSError):
    """The cache directory cannot be used (read-only, disk full, corrupt entry)."""


class CheckpointError(HubloadError, ValueError):
    """A checkpoint file is malformed, truncated or of an unsupported kind."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need arbitrary code execution (pickle globals, Lambda layers) to load."""


class UnsafeArchiveError(UnsafeCheckpointError):
    """An archive member could escape the target folder, is a link/device, or the archive is a bomb.

    Attributes:
        archive: The archive file.
        member: The offending member name (None for whole-archive limits).
    """

    def __init__(self, message: str, *, archive: str, member: str | None = None) -> None:
        self.archive = archive
        self.member = member
        where = f"{archive}: member {member!r}" if member is not None else archive
        super().__init__(f"{where}: {message}; refusing to extract anything from this archive")


class IncompatibleWeightsError(HubloadError, ValueError):
    """The checkpoint does not fit the model; ``report`` (a CompatReport) says exactly how."""

    def __init__(self, message: str, *, report: Any = None) -> None:
        self.report = report
        super().__init__(message)


class MissingDependencyError(HubloadError, ImportError):
    """An optional dependency is missing; the message gives the ``pip install`` line."""

    def __init__(self, what: str, extra: str, *, detail: str = "") -> None:
        self.extra = extra
        msg = f"{what} needs an optional dependency that is not installed{': ' + detail if detail else ''}. " \
              f'Install it with: pip install "hubload[{extra}]"'
        super().__init__(msg)


class UsageError(HubloadError, ValueError):
    """hubload was called wrongly: an unknown option value, or arguments that contradict each other.

    Raised before anything is downloaded or changed; the message names the argument and says what to pass.
    """
