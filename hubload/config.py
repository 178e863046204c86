"""Configuration: explicit arguments first, then environment variables, read at call time.

Environment variables (all optional):

========================  ==============================================================
``HUBLOAD_CACHE``         cache directory (default: the platform's user cache dir)
``HUBLOAD_OFFLINE``       ``1`` makes every cache miss an :class:`~hubload.errors.OfflineError`;
                          ``prefer`` uses what is cached (no request at all, branches not re-resolved)
                          and goes online only for what is missing; ``0`` (default) checks online
``HUBLOAD_LOCK_LEASE``    seconds a download waits for another process downloading the same file that
                          shows no progress, before it goes on by itself (default 60)
``HUBLOAD_MAX_PER_HOST``  concurrent connections to one host, over all downloads of the process (default 8)
``HUBLOAD_REGISTRY``      extra registry files, separated by ``os.pathsep``
``HUBLOAD_CONFIG``        config dir holding the user registry (default: platform user config dir)
``HUBLOAD_DEBUG``         ``1`` shows tracebacks in the CLI
``HUBLOAD_PARALLEL``      concurrent connections per pull (default 8)
``HF_ENDPOINT``           Hugging Face Hub endpoint for ``hf://`` sources
``HF_TOKEN``              Hub token (else the token saved by ``hf auth login``)
``HF_HUB_OFFLINE``        same effect as ``HUBLOAD_OFFLINE``
``HF_HOME``/``HF_HUB_CACHE``  where to look for files already in the Hugging Face cache
========================  ==============================================================
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = [
    "cache_dir",
    "config_dir",
    "debug",
    "hf_endpoint",
    "hf_token",
    "is_offline",
    "lock_lease",
    "max_per_host",
    "parallelism",
    "prefers_cache",
    "registry_env_paths",
    "user_registry_path",
]

_TRUE = {"1", "true", "yes", "on"}
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


def _flag(name: str) -> bool:
    """True when the env var is set to a truthy value."""
    return os.environ.get(name, "").strip().lower() in _TRUE


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``explicit``, else ``HUBLOAD_CACHE``, else the user cache dir."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("HUBLOAD_CACHE")
    if env:
        return Path(env).expanduser()
    return _platform_dir("cache")


def config_dir() -> Path:
    """The user config dir: ``HUBLOAD_CONFIG``, else the platform's user config dir."""
    env = os.environ.get("HUBLOAD_CONFIG")
    if env:
        return Path(env).expanduser()
    return _platform_dir("config")


@functools.lru_cache(maxsize=4)
def _platform_dir(kind: str) -> Path:
    """platformdirs' answer, computed once per process (it depends on XDG_* variables set at start)."""
    import platformdirs

    return Path(platformdirs.user_config_dir("hubload") if kind == "config" else platformdirs.user_cache_dir("hubload"))


def user_registry_path() -> Path:
    """The user's own registry file (may not exist)."""
    return config_dir() / "registry.yaml"


def registry_env_paths() -> list[Path]:
    """Registry files named by ``HUBLOAD_REGISTRY`` (``os.pathsep``-separated), in order."""
    raw = os.environ.get("HUBLOAD_REGISTRY", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def is_offline(explicit: bool | str | None = None) -> bool:
    """Offline mode: ``explicit``, else ``HUBLOAD_OFFLINE`` or ``HF_HUB_OFFLINE`` (``prefer`` is not offline)."""
    if isinstance(explicit, str):
        return explicit.strip().lower() in _TRUE
    if explicit is not None:
        return explicit
    return _flag("HUBLOAD_OFFLINE") or _flag("HF_HUB_OFFLINE")


def prefers_cache(explicit: bool | str | None = None) -> bool:
    """``HUBLOAD_OFFLINE=prefer`` (or ``offline="prefer"``): serve cached files without asking the network.

    Args:
        explicit: An ``offline=`` argument; ``"prefer"`` turns it on, True/False decide alone.

    Returns:
        True when cached entries must be used as they are and only missing files fetched.
    """
    if explicit is not None:
        return isinstance(explicit, str) and explicit.strip().lower() == "prefer"
    return os.environ.get("HUBLOAD_OFFLINE", "").strip().lower() == "prefer"


def lock_lease() -> float:
    """``HUBLOAD_LOCK_LEASE``: seconds without progress after which a lock waiter goes on (default 60)."""
    try:
        return float(os.environ.get("HUBLOAD_LOCK_LEASE", "60"))
    except ValueError:
        return 60.0


def max_per_host() -> int:
    """``HUBLOAD_MAX_PER_HOST``: concurrent connections to one host per process (default 8)."""
    try:
        return max(1, int(os.environ.get("HUBLOAD_MAX_PER_HOST", "8")))
    except ValueError:
        return 8


def debug() -> bool:
    """``HUBLOAD_DEBUG=1``: the CLI shows tracebacks."""
    return _flag("HUBLOAD_DEBUG")


def parallelism(explicit: int | None = None) -> int:
    """Concurrent connections per pull: ``explicit``, else ``HUBLOAD_PARALLEL``, else 8."""
    if explicit is not None:
        return max(1, int(explicit))
    try:
        return max(1, int(os.environ.get("HUBLOAD_PARALLEL", "8")))
    except ValueError:
        return 8


def hf_endpoint() -> str:
    """The Hub endpoint for ``hf://`` sources (``HF_ENDPOINT``), without a trailing slash."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_token(explicit: str | bool | None = None) -> str | None:
    """The Hub token: ``explicit`` (False disables), else ``HF_TOKEN``, else the saved login.

    The saved login is read where ``hf auth login`` writes it (``HF_TOKEN_PATH``, else ``$HF_HOME/token``,
    else ``~/.cache/huggingface/token``) without importing huggingface_hub, which would cost a warm pull
    a quarter of a second.
    """
    if explicit is False:
        return None
    if isinstance(explicit, str):
        return explicit
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env:
        return env.strip() or None
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
        path = os.path.join(home, "token")
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None
