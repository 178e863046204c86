"""Safe extraction of ``.tar``/``.tar.gz``/``.zip`` archives (SavedModel folders shipped as one file).

An archive from the internet is hostile until proven otherwise. Before a single byte is written, every
member is checked; one bad member refuses the whole archive (:class:`UnsafeArchiveError`, naming the
archive and the member):

* names: absolute (``/x``, ``C:x``), ``..``/``.``/empty segments, backslashes, NUL or control characters;
  a leading ``./`` (``tar -C dir .``) is accepted and dropped;
* kinds: only regular files and folders: symlinks, hard links, devices, FIFOs are refused, whatever
  they point at;
* duplicates: the same name twice (also when only the case differs, which collides on macOS/Windows),
  or a file that is also used as a folder;
* bombs: more than ``max_members`` members, more than ``max_total_bytes`` unpacked, or an unpacked size
  more than ``max_ratio`` times the archive's (above a floor), counted from the headers first and again
  from the bytes actually written (zip headers can lie).

Tar members also go through Python's own ``tarfile.data_filter`` as a second opinion. Files are written
with ``O_CREAT | O_EXCL | O_NOFOLLOW`` into a fresh temporary folder inside the cache, which is renamed
into place only when everything succeeded, so a reader sees no folder or a complete one::

    <cache>/extracted/<sha256 of the archive>/...

Mode bits from the archive are ignored (files 0o644, folders 0o755): no setuid, no executables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .errors import CacheError, CheckpointError, UnsafeArchiveError

if TYPE_CHECKING:
    from .cache import Cache

__all__ = [
    "ARCHIVE_SUFFIXES",
    "ArchiveLimits",
    "ArchiveMember",
    "UnsafeArchiveError",
    "extract_archive",
    "extract_to_cache",
    "is_archive",
    "list_archive",
    "savedmodel_root",
]

log = logging.getLogger("hubload")

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds that make a decompression bomb fail fast.

    Attributes:
        max_members: Most members (files and folders) an archive may hold.
        max_total_bytes: Most bytes all files may unpack to.
        max_ratio: Most unpacked bytes per archive byte; only checked above ``ratio_floor``.
        ratio_floor: Unpacked sizes up to this are never refused for their ratio.
    """

    max_members: int = 100_000
    max_total_bytes: int = 256 << 30
    max_ratio: float = 1000.0
    ratio_floor: int = 64 << 20


@dataclass(frozen=True)
class ArchiveMember:
    """One checked member: its safe relative name, whether it is a folder, and its declared size."""

    name: str
    is_dir: bool
    size: int


def is_archive(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends with one of :data:`ARCHIVE_SUFFIXES`."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


# ------------------------------------------------------------------------------------------- checks


def _safe_name(raw: str, archive: str) -> str:
    """The member name as a safe relative POSIX path ('' for the archive root), or raise."""
    name = raw
    if "\\" in name:
        raise UnsafeArchiveError("name contains a backslash (a Windows path separator)", archive=archive, member=raw)
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise UnsafeArchiveError("name contains a NUL or control character", archive=archive, member=raw)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError("absolute path", archive=archive, member=raw)
    name = name.rstrip("/") if name not in ("/", "") else name
    while name.startswith("./"):
        name = name[2:]
    if name in (".", ""):
        return ""
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeArchiveError("'..' segment would escape the target folder", archive=archive, member=raw)
    if any(p in ("", ".") for p in parts):
        raise UnsafeArchiveError("empty or '.' segment in the name", archive=archive, member=raw)
    return name


class _Listing:
    """Accumulates members, refusing duplicates, file/folder conflicts and limit overruns."""

    def __init__(self, archive: str, limits: ArchiveLimits, archive_size: int) -> None:
        self.archive = archive
        self.limits = limits
        self.archive_size = archive_size
        self.members: list[ArchiveMember] = []
        self.kinds: dict[str, bool] = {}  # casefolded name -> is_dir
        self.total = 0

    def add(self, raw: str, is_dir: bool, size: int) -> ArchiveMember | None:
        """Check and record one member (None for the archive root entry)."""
        name = _safe_name(raw, self.archive)
        if not name:
            if not is_dir:
                raise UnsafeArchiveError("a file member without a name", archive=self.archive, member=raw)
            return None
        if len(self.members) >= self.limits.max_members:
            raise UnsafeArchiveError(f"more than {self.limits.max_members} members (an archive bomb?)",
                                     archive=self.archive)
        key = name.casefold()
        if key in self.kinds:
            if not (is_dir and self.kinds[key]):  # a folder listed twice is harmless
                raise UnsafeArchiveError("duplicate name (a second copy would overwrite the first)",
                                         archive=self.archive, member=raw)
            return None
        parts = key.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if self.kinds.get(parent) is False:
                raise UnsafeArchiveError(f"its parent {parent!r} is a file member", archive=self.archive, member=raw)
        self.kinds[key] = is_dir
        # parents implied by the path become folders: a later *file* of that name is a conflict
        for i in range(1, len(parts)):
            self.kinds.setdefault("/".join(parts[:i]), True)
        if size < 0:
            raise UnsafeArchiveError(f"negative size {size}", archive=self.archive, member=raw)
        self.total += size
        self.check_total(self.total, member=raw)
        member = ArchiveMember(name, is_dir, 0 if is_dir else size)
        self.members.append(member)
        return member

    def check_total(self, total: int, *, member: str | None = None) -> None:
        """Refuse when ``total`` unpacked bytes break the size or ratio limit."""
        lim = self.limits
        if total > lim.max_total_bytes:
            raise UnsafeArchiveError(f"unpacks to more than {lim.max_total_bytes} bytes (an archive bomb?)",
                                     archive=self.archive, member=member)
        if total > lim.ratio_floor and total > lim.max_ratio * max(self.archive_size, 1):
            raise UnsafeArchiveError(f"unpacks to {total} bytes from {self.archive_size} "
                                     f"(more than {lim.max_ratio:g}x: an archive bomb?)",
                                     archive=self.archive, member=member)


def _tar_kind(info: tarfile.TarInfo, archive: str) -> bool:
    """True for a folder, False for a regular file; raise for links, devices, FIFOs."""
    if info.issym() or info.islnk():
        raise UnsafeArchiveError(f"is a {'symbolic' if info.issym() else 'hard'} link to {info.linkname!r}; "
                                 "archives may hold only files and folders", archive=archive, member=info.name)
    if info.isdir():
        return True
    if info.isreg():
        return False
    what = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "FIFO"}.get(info.type, f"member of tar type {info.type!r}")
    raise UnsafeArchiveError(f"is a {what}; archives may hold only files and folders", archive=archive,
                             member=info.name)


def _zip_kind(info: zipfile.ZipInfo, archive: str) -> bool:
    """True for a folder, False for a regular file; raise for symlinks and other Unix special files."""
    mode = info.external_attr >> 16
    ftype = stat.S_IFMT(mode)  # 0 when the writer stored permission bits only (Python's writestr, Windows)
    if ftype and (stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
        what = "symbolic link" if stat.S_ISLNK(mode) else "special file (device, FIFO or socket)"
        raise UnsafeArchiveError(f"is a {what}; archives may hold only files and folders", archive=archive,
                                 member=info.filename)
    if info.flag_bits & 0x1:
        raise UnsafeArchiveError("is encrypted", archive=archive, member=info.filename)
    return info.is_dir()


@contextlib.contextmanager
def _open(path: Path) -> Iterator[tuple[str, object]]:
    """Open ``path`` as ("zip", ZipFile) or ("tar", TarFile), or raise CheckpointError."""
    if zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable zip archive: {exc}") from exc
        with zf:
            yield "zip", zf
        return
    try:
        tf = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable tar or zip archive ({exc}); the download may be truncated "
                              "— delete it and pull again") from exc
    with tf:
        yield "tar", tf


def _scan(kind: str, handle: object, archive: Path,
          limits: ArchiveLimits) -> tuple[_Listing, list[tuple[ArchiveMember, object]]]:
    """Check every member before anything is written; return the listing and (member, native info) pairs."""
    name = str(archive)
    listing = _Listing(name, limits, archive.stat().st_size)
    out: list[tuple[ArchiveMember, object]] = []
    if kind == "zip":
        assert isinstance(handle, zipfile.ZipFile)
        for zinfo in handle.infolist():
            m = listing.add(zinfo.filename, _zip_kind(zinfo, name), zinfo.file_size)
            if m is not None:
                out.append((m, zinfo))
        return listing, out
    assert isinstance(handle, tarfile.TarFile)
    data_filter = getattr(tarfile, "data_filter", None)  # None before Python 3.10.12 / 3.11.4
    try:
        while (tinfo := handle.next()) is not None:  # one at a time: a bomb stops at the first overrun
            is_dir = _tar_kind(tinfo, name)
            m = listing.add(tinfo.name, is_dir, tinfo.size)
            if m is None:
                continue
            if data_filter is not None:  # the standard library's own opinion, on top of ours
                try:
                    data_filter(tinfo, "/nonexistent-hubload-extract-root")
                except tarfile.FilterError as exc:
                    raise UnsafeArchiveError(f"refused by tarfile's data filter: {exc}", archive=name,
                                             member=tinfo.name) from None
            out.append((m, tinfo))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(f"{archive}: corrupt or truncated tar archive ({exc}); delete it and pull again") from exc
    return listing, out


def list_archive(path: str | os.PathLike[str], *, limits: ArchiveLimits | None = None) -> list[ArchiveMember]:
    """Check an archive's members without extracting anything.

    Args:
        path: A tar (optionally gz/bz2/xz compressed) or zip file.
        limits: Bomb limits (default :class:`ArchiveLimits`).

    Returns:
        The members (safe relative names), in archive order; the root entry (``./``) is left out.

    Raises:
        UnsafeArchiveError: A member is unsafe or a limit is exceeded (names the member).
        CheckpointError: Not a readable archive.
    """
    p = Path(path)
    with _open(p) as (kind, handle):
        _, checked = _scan(kind, handle, p, limits or ArchiveLimits())
        return [m for m, _ in checked]


# ----------------------------------------------------------------------------------------- extraction


def _write_member(dest_root: Path, member: ArchiveMember, src: IO[bytes], listing: _Listing,
                  written: list[int], raw_name: str) -> None:
    """Copy one file member to ``dest_root/name`` with O_EXCL|O_NOFOLLOW, counting bytes."""
    target = dest_root.joinpath(*member.name.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        left = member.size
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            left -= len(chunk)
            written[0] += len(chunk)
            if left < 0:
                raise UnsafeArchiveError(f"holds more bytes than its header declares ({member.size})",
                                         archive=listing.archive, member=raw_name)
            listing.check_total(written[0], member=raw_name)
            out.write(chunk)


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                    limits: ArchiveLimits | None = None) -> Path:
    """Extract a checked archive into ``dest``, atomically: ``dest`` appears complete or not at all.

    Every member is checked first (see the module docstring); then the files are written into a
    temporary folder next to ``dest`` which is renamed to ``dest``. If ``dest`` already exists (another
    process won the race) it is kept and the temporary copy dropped.

    Args:
        archive: The archive file.
        dest: The folder to create (its parent must be writable; it must not exist, or it is returned as is).
        limits: Bomb limits.

    Returns:
        ``dest``.

    Raises:
        UnsafeArchiveError: An unsafe member or a bomb; nothing is left behind.
        CheckpointError: Not a readable archive.
        CacheError: ``dest``'s parent is not writable or the disk is full.
    """
    src = Path(archive)
    dest = Path(dest)
    if dest.is_dir():
        return dest
    limits = limits or ArchiveLimits()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        from .cache_fs import cache_os_error

        raise cache_os_error(exc, dest.parent, "creating") from exc
    try:
        with _open(src) as (kind, handle):
            listing, checked = _scan(kind, handle, src, limits)  # its check_total also bounds the bytes written
            written = [0]
            for member, info in checked:
                target = tmp.joinpath(*member.name.split("/"))
                if member.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                raw_name = info.filename if kind == "zip" else info.name  # type: ignore[attr-defined]
                if kind == "zip":
                    stream = handle.open(info)  # type: ignore[attr-defined]
                else:
                    stream = handle.extractfile(info)  # type: ignore[attr-defined]
                    if stream is None:  # pragma: no cover - _tar_kind allowed only regular files
                        raise UnsafeArchiveError("has no data", archive=str(src), member=raw_name)
                with stream:
                    _write_member(tmp, member, stream, listing, written, raw_name)
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            os.chmod(d, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:
            if dest.is_dir():  # a concurrent extraction finished first: same bytes, keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{src}: corrupt archive ({type(exc).__name__}: {exc}); delete it and pull again") from exc
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (CacheError, CheckpointError)):
            raise
        from .cache_fs import cache_os_error

        raise cache_os_error(exc, dest, "extracting into") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("extracted %s (%d members) to %s", src.name, len(checked), dest)
    return dest


def extract_to_cache(archive: str | os.PathLike[str], sha256: str, *, cache: Cache | None = None,
                     limits: ArchiveLimits | None = None) -> Path:
    """Extract a verified archive blob once into ``<cache>/extracted/<sha256>`` (shared, locked).

    Args:
        archive: The archive (normally the verified blob itself).
        sha256: Its sha256 (names the folder, so identical archives share one extraction).
        cache: The cache (default: ``HUBLOAD_CACHE``).
        limits: Bomb limits.

    Returns:
        The extracted folder.

    Raises:
        UnsafeArchiveError, CheckpointError, CacheError: see :func:`extract_archive`.
        ValueError: ``sha256`` is not 64 lowercase hex digits.
    """
    from .cache import Cache
    from .registry import _HEX64  # here, not at the top: `import hubload.archive` stays light

    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    cache = cache or Cache()
    dest = cache.root / "extracted" / sha256
    if dest.is_dir():
        return dest
    with cache.lock(f"extract-{sha256}"):
        return extract_archive(archive, dest, limits=limits)


def savedmodel_root(folder: str | os.PathLike[str]) -> Path:
    """The folder holding ``saved_model.pb`` inside an extracted archive (the root or one level down).

    Raises:
        CheckpointError: No SavedModel, or several.
    """
    root = Path(folder)
    if (root / "saved_model.pb").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/saved_model.pb") if p.is_file() and not p.is_symlink())
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{root}: the archive holds no saved_model.pb (at its root or one folder down)")
    raise CheckpointError(f"{root}: the archive holds several SavedModels ({', '.join(p.name for p in found)}); "
                          "ship one per archive")
