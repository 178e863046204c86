"""Hostile and malformed input (issue 6): archives, safetensors through the public API and CLI, registries
through the CLI, symlinks in file:// sources, and property tests the other suites do not have.

Each case proves three things: a clear error naming what is wrong (file, member, entry, field), no partial
state (nothing extracted, nothing in the cache), and nothing run. Framework-specific checkpoints (pickles,
``.keras``) live in ``tests/adapters/test_hostile_checkpoints.py``.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hubload
from hubload.archive import (
    ArchiveLimits,
    UnsafeArchiveError,
    extract_archive,
    extract_to_cache,
    is_archive,
    list_archive,
    savedmodel_root,
)
from hubload.cache import Cache, sha256_file
from hubload.cli import cli
from hubload.errors import CheckpointError, HubloadError, RegistryError, UnsafeCheckpointError
from hubload.layout import KERAS_RULES, from_canonical, to_canonical
from hubload.fetch import pull
from hubload.readers import TensorInfo
from hubload.registry import Registry, parse_registry

SHA = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m hubload ARGS`` as a real subprocess, with the test's isolated environment."""
    return subprocess.run([sys.executable, "-m", "hubload", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def one_line(stderr: str) -> str:
    """The single error line a failing command prints (no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def cache_is_empty(root: Path) -> bool:
    """True when no blob, snapshot or extraction exists under the cache root."""
    return not any(p.is_file() or p.is_symlink() for sub in ("blobs", "models", "extracted")
                   for p in (root / sub).rglob("*"))


# ================================================================================================ archives


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    """Write a tar with hand-made headers (names, types and link targets exactly as given)."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _ti(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    import warnings

    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name" is exactly what we want to write
        for name, data in members:
            zf.writestr(name, data)
    return path


def _zip_symlink(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


GOOD_TREE = {"saved_model.pb": b"graph", "variables/variables.index": b"idx",
             "variables/variables.data-00000-of-00001": b"\0" * 100, "assets/vocab.txt": b"a\nb\n"}


@pytest.mark.parametrize("fmt", ["tar", "tar.gz", "zip", "tar-dot"])
def test_good_archive_extracts_atomically_with_safe_modes(tmp_path, fmt):
    src = tmp_path / f"m.{fmt.replace('-dot', '')}"
    if fmt == "zip":
        _zip(src, list(GOOD_TREE.items()))
    else:
        prefix = "./" if fmt == "tar-dot" else ""
        members = [(_ti(".", tarfile.DIRTYPE), None)] if fmt == "tar-dot" else []
        members += [(_ti(prefix + name, mode=0o4755), data) for name, data in GOOD_TREE.items()]  # setuid bit
        _tar(src, members, "w:gz" if fmt == "tar.gz" else "w")
    assert is_archive(src)
    assert sorted(m.name for m in list_archive(src) if not m.is_dir) == sorted(GOOD_TREE)
    dest = extract_archive(src, tmp_path / "out")
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == GOOD_TREE
    for p in dest.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))  # no setuid, no exec from the archive
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    assert savedmodel_root(dest) == dest


def _hostile_archives(tmp: Path) -> list[tuple[str, Path, str, str | None]]:
    """(label, archive, message fragment, offending member) for every kind of hostile archive."""
    ok = b"x"
    cases = [
        ("tar-absolute", _tar(tmp / "abs.tar", [(_ti("/etc/cron.d/evil"), ok)]), "absolute", "/etc/cron.d/evil"),
        ("tar-dotdot", _tar(tmp / "up.tar", [(_ti("a/../../evil"), ok)]), "'..'", "a/../../evil"),
        ("tar-dotdot-lead", _tar(tmp / "up2.tar", [(_ti("../evil"), ok)]), "'..'", "../evil"),
        ("tar-backslash", _tar(tmp / "bs.tar", [(_ti("..\\..\\evil"), ok)]), "backslash", "..\\..\\evil"),
        ("tar-drive", _tar(tmp / "drv.tar", [(_ti("C:evil"), ok)]), "absolute", "C:evil"),
        ("tar-control", _tar(tmp / "nl.tar", [(_ti("a\nb"), ok)]), "control", "a\nb"),
        ("tar-symlink-out", _tar(tmp / "sl.tar", [(_ti("link", tarfile.SYMTYPE, linkname="/etc/passwd"), None)]),
         "symbolic link", "link"),
        ("tar-symlink-in", _tar(tmp / "sl2.tar", [(_ti("a"), ok), (_ti("b", tarfile.SYMTYPE, linkname="a"), None)]),
         "symbolic link", "b"),
        ("tar-hardlink", _tar(tmp / "hl.tar", [(_ti("a"), ok), (_ti("b", tarfile.LNKTYPE, linkname="a"), None)]),
         "hard link", "b"),
        ("tar-hardlink-out", _tar(tmp / "hl2.tar", [(_ti("b", tarfile.LNKTYPE, linkname="/etc/shadow"), None)]),
         "hard link", "b"),
        ("tar-chardev", _tar(tmp / "chr.tar", [(_ti("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)]),
         "character device", "null"),
        ("tar-blockdev", _tar(tmp / "blk.tar", [(_ti("sda", tarfile.BLKTYPE, devmajor=8), None)]),
         "block device", "sda"),
        ("tar-fifo", _tar(tmp / "fifo.tar", [(_ti("pipe", tarfile.FIFOTYPE), None)]), "FIFO", "pipe"),
        ("tar-duplicate", _tar(tmp / "dup.tar", [(_ti("a"), ok), (_ti("a"), b"y")]), "duplicate", "a"),
        ("tar-duplicate-case", _tar(tmp / "dupc.tar", [(_ti("Model.pb"), ok), (_ti("model.pb"), ok)]),
         "duplicate", "model.pb"),
        ("tar-file-as-parent", _tar(tmp / "fp.tar", [(_ti("a"), ok), (_ti("a/b"), ok)]), "parent", "a/b"),
        ("tar-dir-then-file", _tar(tmp / "df.tar", [(_ti("a/b"), ok), (_ti("a"), ok)]), "duplicate", "a"),
        ("tar-empty-segment", _tar(tmp / "es.tar", [(_ti("a//b"), ok)]), "empty", "a//b"),
        ("zip-dotdot", _zip(tmp / "up.zip", [("../../evil", ok)]), "'..'", "../../evil"),
        ("zip-absolute", _zip(tmp / "abs.zip", [("/tmp/evil", ok)]), "absolute", "/tmp/evil"),
        ("zip-backslash", _zip(tmp / "bs.zip", [("..\\evil", ok)]), "backslash", "..\\evil"),
        ("zip-symlink", _zip(tmp / "sl.zip", [(_zip_symlink("link", "/etc/passwd"), b"/etc/passwd")]),
         "symbolic link", "link"),
        ("zip-duplicate", _zip(tmp / "dup.zip", [("a", ok), ("a", b"y")]), "duplicate", "a"),
    ]
    fifo = zipfile.ZipInfo("fifo")
    fifo.create_system, fifo.external_attr = 3, (stat.S_IFIFO | 0o644) << 16
    cases.append(("zip-fifo", _zip(tmp / "fifo.zip", [(fifo, b"")]), "special file", "fifo"))
    return cases


def test_hostile_archives_are_refused_naming_archive_and_member_and_leave_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "src").mkdir()
    cases = _hostile_archives(tmp_path / "src")
    refused = 0
    for label, archive, fragment, member in cases:
        dest = victim / "out" / label
        with pytest.raises(UnsafeArchiveError) as ei:
            extract_archive(archive, dest)
        err = ei.value
        assert isinstance(err, UnsafeCheckpointError) and isinstance(err, HubloadError), label
        assert fragment in str(err), (label, str(err))
        assert str(archive) in str(err) and err.archive == str(archive), label
        assert err.member == member and repr(member) in str(err), (label, str(err))
        with pytest.raises(UnsafeArchiveError):
            list_archive(archive)
        assert not dest.exists(), label
        refused += 1
    # nothing at all was written anywhere: no partial folder, no escaped file, no temp dir
    assert [p for p in victim.rglob("*") if p.name != "out"] == []
    assert not Path("/etc/cron.d/evil").exists() and not (tmp_path.parent / "evil").exists()
    assert refused == len(cases) == 24


def test_a_bad_member_after_good_ones_leaves_no_partial_folder(tmp_path):
    src = _tar(tmp_path / "late.tar", [(_ti("saved_model.pb"), b"g" * 1000), (_ti("variables/v"), b"v"),
                                       (_ti("z", tarfile.SYMTYPE, linkname="../../.."), None)])
    with pytest.raises(UnsafeArchiveError, match="'z'"):
        extract_archive(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.tar"]


@pytest.mark.parametrize("kind", ["members", "total", "ratio", "zip-lies"])
def test_archive_bombs_hit_the_limits(tmp_path, kind):
    if kind == "members":
        src = _tar(tmp_path / "many.tar", [(_ti(f"f{i}"), b"") for i in range(50)])
        limits, fragment = ArchiveLimits(max_members=20), "more than 20 members"
    elif kind == "total":
        src = _tar(tmp_path / "big.tar.gz", [(_ti("zeros"), b"\0" * 200_000)], "w:gz")
        limits, fragment = ArchiveLimits(max_total_bytes=100_000), "more than 100000 bytes"
    elif kind == "ratio":
        src = _tar(tmp_path / "bomb.tar.gz", [(_ti("zeros"), b"\0" * 2_000_000)], "w:gz")
        assert src.stat().st_size < 20_000  # gzip squeezes zeros > 100x
        limits, fragment = ArchiveLimits(max_ratio=50, ratio_floor=1000), "an archive bomb"
    else:  # a zip whose central directory under-declares the size: the bytes actually written are counted
        src = _zip(tmp_path / "liar.zip", [("zeros", b"\0" * 300_000)])
        blob = bytearray(src.read_bytes())
        cd = blob.rfind(b"PK\x01\x02")
        blob[cd + 24:cd + 28] = (10).to_bytes(4, "little")  # uncompressed size in the central directory
        src.write_bytes(bytes(blob))
        limits, fragment = ArchiveLimits(max_total_bytes=100_000), "liar.zip"
    with pytest.raises((UnsafeArchiveError, CheckpointError), match=fragment):
        extract_archive(src, tmp_path / "out", limits=limits)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_corrupt_and_truncated_archives_are_checkpoint_errors(tmp_path):
    good = _tar(tmp_path / "g.tar.gz", [(_ti("saved_model.pb"), os.urandom(50_000))], "w:gz")
    trunc = tmp_path / "t.tar.gz"
    trunc.write_bytes(good.read_bytes()[:-2000])
    junk = tmp_path / "j.tar"
    junk.write_bytes(b"this is not an archive at all" * 10)
    for bad in (trunc, junk):
        with pytest.raises(CheckpointError, match=bad.name) as ei:
            extract_archive(bad, tmp_path / "out")
        assert not isinstance(ei.value, UnsafeArchiveError)
        assert not (tmp_path / "out").exists()


def test_extract_to_cache_is_content_addressed_and_idempotent(tmp_path):
    src = _zip(tmp_path / "sm.zip", [("model/" + k, v) for k, v in GOOD_TREE.items()])
    sha = sha256_file(src)
    cache = Cache(tmp_path / "cache")
    first = extract_to_cache(src, sha, cache=cache)
    assert first == cache.root / "extracted" / sha
    assert savedmodel_root(first) == first / "model"
    stamp = (first / "model" / "saved_model.pb").stat().st_mtime_ns
    assert extract_to_cache(src, sha, cache=cache) == first  # second call: no re-extraction
    assert (first / "model" / "saved_model.pb").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="sha256"):
        extract_to_cache(src, "../../etc", cache=cache)
    bad = _zip(tmp_path / "evil.zip", [("../escape", b"x")])
    with pytest.raises(UnsafeArchiveError):
        extract_to_cache(bad, sha256_file(bad), cache=cache)
    assert sorted(p.name for p in (cache.root / "extracted").iterdir()) == [sha]
    assert not (cache.root / "escape").exists() and not (cache.root / "extracted" / "escape").exists()


def test_savedmodel_root_needs_exactly_one(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="no saved_model.pb"):
        savedmodel_root(tmp_path)
    for d in ("a", "b"):
        (tmp_path / d).mkdir(exist_ok=True)
        (tmp_path / d / "saved_model.pb").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several"):
        savedmodel_root(tmp_path)


def test_registry_savedmodel_archive_is_extracted_into_the_cache(tmp_path):
    src_dir = tmp_path / "weights"
    src_dir.mkdir()
    archive = _tar(src_dir / "sm.tar.gz", [(_ti("sm/" + k), v) for k, v in GOOD_TREE.items()], "w:gz")
    reg = {"version": 1, "models": {"sm": {"source": f"file://{src_dir}", "format": "savedmodel",
                                            "files": [{"path": "sm.tar.gz", "sha256": sha256_file(archive)}]}}}
    from hubload.resolve import fetch_artifact, resolve_source

    art = fetch_artifact(resolve_source("sm", registry=reg), cache=Cache())
    assert art.path is not None and art.path.is_dir() and (art.path / "saved_model.pb").is_file()
    assert Cache().root / "extracted" in art.path.parents


# ============================================================================== hostile safetensors files


def _st(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


def _hostile_safetensors(tmp: Path) -> list[tuple[Path, str]]:
    """(file, message fragment) for the hostile safetensors cases issue 6 names, plus a few more."""
    f32 = lambda shape, a, b: {"dtype": "F32", "shape": shape, "data_offsets": [a, b]}  # noqa: E731
    return [
        (_st(tmp / "huge_header.safetensors", {}, length=3 << 30), "header claims"),             # 3 GiB header
        (_st(tmp / "huge_tensor.safetensors", {"w": f32([1 << 20, 1 << 20], 0, 4 << 40)}), "truncated"),  # 4 TiB
        (_st(tmp / "overlap.safetensors", {"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, b"\0" * 12), "overlaps"),
        (_st(tmp / "alias.safetensors", {"a": f32([2], 0, 8), "b": f32([2], 0, 8)}, b"\0" * 8), "overlaps"),
        (_st(tmp / "truncated.safetensors", {"a": f32([4], 0, 16)}, b"\0" * 9), "truncated"),
        (_st(tmp / "short.safetensors", b""), "too small"),
        (_st(tmp / "dtype.safetensors", {"a": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
         "dtype 'Q4_K'"),
        (_st(tmp / "object.safetensors", {"a": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
         "dtype 'O'"),
        (_st(tmp / "negshape.safetensors", {"a": f32([-4], 0, 16)}, b"\0" * 16), "invalid shape"),
        (_st(tmp / "floatshape.safetensors", {"a": f32([2.0], 0, 8)}, b"\0" * 8), "invalid shape"),
        (_st(tmp / "boolshape.safetensors", {"a": f32([True], 0, 4)}, b"\0" * 4), "invalid shape"),
        (_st(tmp / "hugeshape.safetensors", {"a": f32([1 << 62, 1 << 62], 0, 16)}, b"\0" * 16), "span 16 bytes"),
        (_st(tmp / "notjson.safetensors", b"{\"a\": ", b""), "not valid JSON"),
        (_st(tmp / "utf16.safetensors", "{}".encode("utf-16"), b""), "not valid JSON"),
    ]


def test_hostile_safetensors_through_inspect_and_check_api(tmp_path):
    cases = _hostile_safetensors(tmp_path)
    for path, fragment in cases:
        with pytest.raises(CheckpointError, match=fragment) as ei:
            hubload.inspect(str(path))
        assert str(path) in str(ei.value), str(ei.value)
    assert cache_is_empty(Path(os.environ["HUBLOAD_CACHE"]))
    assert len(cases) == 14


def test_hostile_safetensors_through_the_cli_inspect(tmp_path):
    for path, fragment in _hostile_safetensors(tmp_path)[:5]:  # a subprocess each: a representative subset
        proc = run_cli("inspect", str(path))
        assert proc.returncode == 2, proc
        line = one_line(proc.stderr)
        assert line.startswith("hubload: error: CheckpointError:") and str(path) in line and fragment in line
        assert proc.stdout == ""


def test_hostile_remote_safetensors_is_refused_from_its_header_before_any_download(file_server, tmp_path):
    # 8 + 2 GiB "header" on the server; the pre-check must stop at the first Range request
    body = (3 << 30).to_bytes(8, "little") + b"{}" + b"\0" * 100_000
    url = file_server.add("/m/model.safetensors", body)
    with pytest.raises(CheckpointError, match="header claims") as ei:
        hubload.inspect(url)
    assert url in str(ei.value)
    gets = [r for r in file_server.requests if r.method == "GET"]
    assert gets and all(r.range for r in gets)  # only Range requests, never the whole file
    assert sum(r.bytes_sent for r in gets) <= 64 * 1024 + 8
    assert cache_is_empty(Path(os.environ["HUBLOAD_CACHE"]))


# ================================================================================ hostile registry files

ENTRY = f"""\
version: 1
models:
  good:
    source: https://example.com/w/
    files:
      - {{path: model.safetensors, sha256: {SHA}, size: 10}}
    format: safetensors
    architecture: {{torch: "pkg.mod:fn"}}
    config: {{hidden: 4}}
    head: ["fc.*"]
    rename: [{{pattern: "^a", replace: "b"}}]
"""


def _swap(old: str, new: str) -> str:
    assert old in ENTRY, old
    return ENTRY.replace(old, new, 1)


# (category, registry text, marker to find the expected line (None: no line), entry, field, message fragment)
REGISTRY_CASES = [
    # ---- not YAML
    ("not-yaml", "version: 1\nmodels: [\n", None, None, None, "not valid YAML"),
    ("not-yaml", "version: 1\nmodels:\n\tm: {}\n", None, None, None, "not valid YAML"),
    ("not-yaml", "version: 1\nmodels: {a: 1\n", None, None, None, "not valid YAML"),
    ("not-yaml", "- just\n- a list\n", None, None, None, "top level must be a mapping"),
    ("not-yaml", "", None, None, None, "empty"),
    ("not-yaml", "just a sentence\n", None, None, None, "top level must be a mapping"),
    # ---- wrong types
    ("wrong-type", "version: one\nmodels: {}\n", "version", None, "version", "unsupported version"),
    ("wrong-type", "version: 1\nmodels: [a, b]\n", "models", None, "models", "must be a mapping"),
    ("wrong-type", _swap("    files:\n      - {path: model.safetensors, sha256: " + SHA + ", size: 10}",
                         "    files: model.safetensors"), "files:", "good", "files", "non-empty list"),
    ("wrong-type", _swap("size: 10", "size: ten"), "size:", "good", "files[0].size", "non-negative integer"),
    ("wrong-type", _swap("size: 10", "size: true"), "size:", "good", "files[0].size", "non-negative integer"),
    ("wrong-type", _swap("size: 10", "size: 1.5"), "size:", "good", "files[0].size", "non-negative integer"),
    ("wrong-type", _swap("source: https://example.com/w/", "source: 42"), "source:", "good", "source",
     "non-empty string"),
    ("wrong-type", _swap('architecture: {torch: "pkg.mod:fn"}', "architecture: [torch]"), "architecture:",
     "good", "architecture", "mapping"),
    ("wrong-type", _swap("config: {hidden: 4}", "config: 4"), "config:", "good", "config", "mapping"),
    ("wrong-type", _swap('rename: [{pattern: "^a", replace: "b"}]', "rename: {a: b}"), "rename:", "good",
     "rename", "list"),
    ("wrong-type", _swap('head: ["fc.*"]', "head: {fc: 1}"), "head:", "good", "head", "list of strings"),
    ("wrong-type", _swap("format: safetensors", "format: [safetensors]"), "format:", "good", "format",
     "non-empty string"),
    ("wrong-type", "version: 1\nmodels:\n  m: just-a-string\n", "  m:", "m", None, "must be a mapping"),
    ("wrong-type", _swap("      - {path: model.safetensors", "      - {path: [a, b]"), "path:", "good",
     "files[0].path", "non-empty string"),
    # ---- unknown keys
    ("unknown-key", ENTRY + "extra: 1\n", "extra:", None, None, "unknown top-level key 'extra'"),
    ("unknown-key", _swap("format: safetensors", "format: safetensors\n    sha256: " + SHA), "    sha256:",
     "good", "sha256", "unknown key 'sha256'"),
    ("unknown-key", _swap("size: 10}", "size: 10, url: 'http://evil/'}"), "url:", "good", "files[0]",
     "unknown key(s) url"),
    ("unknown-key", _swap("format: safetensors", "format: safetensors\n    archtecture: {}"), "archtecture:",
     "good", "archtecture", "did you mean 'architecture'"),
    # ---- duplicate IDs / keys
    ("duplicate", ENTRY + ENTRY.split("models:\n", 1)[1], "last:  good:", None, None, "duplicate key 'good'"),
    ("duplicate", _swap("format: safetensors", "format: safetensors\n    format: npz"), "    format: npz",
     None, None, "duplicate key 'format'"),
    ("duplicate", _swap("size: 10}", f"size: 10}}\n      - {{path: model.safetensors, sha256: {SHA}}}"),
     "      - {path", "good", "files", "listed twice"),
    # ---- missing fields
    ("missing", "models: {}\n", None, None, None, "missing 'version: 1'"),
    ("missing", "version: 1\nmodels:\n  m:\n    source: https://e.com/\n", "    source:", "m", "files",
     "missing required field 'files'"),
    ("missing", f"version: 1\nmodels:\n  m:\n    files: [{{path: a.npz, sha256: {SHA}}}]\n", "    files:", "m", "source",
     "missing required field 'source'"),
    ("missing", _swap("      - {path: model.safetensors, ", "      - {"), "      - {", "good", "files[0]",
     "missing 'path'"),
    ("missing", _swap("    files:\n      - {path: model.safetensors, sha256: " + SHA + ", size: 10}",
                      "    files: []"), "files:", "good", "files", "non-empty list"),
    ("missing", _swap(f"sha256: {SHA}, ", ""), "      - {path", "good", "files", "no sha256"),
    ("missing", "version: 1\nmodels:\n  m:\n    source: https://e.com/\n    files: [{path: weights, sha256: "
     f"{SHA}}}]\n", "    source:", "m", "format", "cannot infer the format"),
    # ---- traversal
    ("traversal", _swap("path: model.safetensors", "path: ../../etc/passwd"), "path:", "good", "files[0].path",
     "could escape"),
    ("traversal", _swap("path: model.safetensors", "path: sub/../../x.bin"), "path:", "good", "files[0].path",
     "could escape"),
    ("traversal", _swap("path: model.safetensors", "path: /etc/passwd"), "path:", "good", "files[0].path",
     "absolute"),
    ("traversal", _swap("path: model.safetensors", "path: 'C:\\\\x.bin'"), "path:", "good", "files[0].path",
     "backslash"),
    ("traversal", _swap("path: model.safetensors", "path: 'C:x.bin'"), "path:", "good", "files[0].path",
     "absolute"),
    ("traversal", _swap("path: model.safetensors", "path: '..\\\\..\\\\x.bin'"), "path:", "good",
     "files[0].path", "backslash"),
    ("traversal", _swap("path: model.safetensors", 'path: "a\\0b.bin"'), "path:", "good", "files[0].path",
     "control character"),
    ("traversal", _swap("path: model.safetensors", "path: ./model.safetensors"), "path:", "good",
     "files[0].path", "could escape"),
    ("traversal", _swap("source: https://example.com/w/", "source: hf://../../etc"), "source:", "good", "source",
     "not a Hub repository"),
    ("traversal", _swap("source: https://example.com/w/", "source: 'weights\\\\x'"), "source:", "good", "source",
     "backslashes"),
    ("traversal", _swap("source: https://example.com/w/", "source: hf://org/name\n    revision: ../../x"),
     "revision:", "good", "revision", "not a valid commit"),
    ("traversal", "version: 1\nmodels:\n  ../evil:\n    source: https://e.com/\n    files: [{path: a.npz, "
     f"sha256: {SHA}}}]\n", "    source:", "../evil", None, "model IDs are"),
    ("traversal", "version: 1\nmodels:\n  /abs:\n    source: https://e.com/\n    files: [{path: a.npz, "
     f"sha256: {SHA}}}]\n", "    source:", "/abs", None, "model IDs are"),
    # ---- schemes
    ("scheme", _swap("source: https://example.com/w/", "source: ftp://example.com/w/"), "source:", "good",
     "source", "not allowed"),
    ("scheme", _swap("source: https://example.com/w/", "source: s3://bucket/w/"), "source:", "good", "source",
     "not allowed"),
    ("scheme", _swap("source: https://example.com/w/", "source: 'javascript:alert(1)'"), "source:", "good",
     "source", "not allowed"),
    ("scheme", _swap("source: https://example.com/w/", "source: 'data:application/octet-stream;base64,AA=='"),
     "source:", "good", "source", "not allowed"),
    ("scheme", _swap("source: https://example.com/w/", "source: 'gopher://example.com/'"), "source:", "good",
     "source", "not allowed"),
    ("scheme", _swap("source: https://example.com/w/", "source: 'https://user:secret@example.com/w/'"),
     "source:", "good", "source", "credentials"),
    ("scheme", _swap("source: https://example.com/w/", "source: 'https:///nohost'"), "source:", "good",
     "source", "no host"),
    # ---- hash of the wrong length / shape
    ("hash", _swap(f"sha256: {SHA}", f"sha256: {SHA[:63]}"), "sha256:", "good", "files[0].sha256", "64 hex"),
    ("hash", _swap(f"sha256: {SHA}", f"sha256: {SHA}ab"), "sha256:", "good", "files[0].sha256", "64 hex"),
    ("hash", _swap(f"sha256: {SHA}", "sha256: " + "g" * 64), "sha256:", "good", "files[0].sha256", "64 hex"),
    ("hash", _swap(f"sha256: {SHA}", "sha256: 12345"), "sha256:", "good", "files[0].sha256", "64 hex"),
    ("hash", _swap(f"sha256: {SHA}", "sha256: 'sha256:" + SHA + "'"), "sha256:", "good", "files[0].sha256",
     "64 hex"),
    ("hash", _swap(f"sha256: {SHA}", "sha256_prefix: abc"), "sha256_prefix:", "good", "files[0].sha256_prefix",
     "8 to 63 hex"),
    ("hash", _swap(f"sha256: {SHA}", "sha256_prefix: " + SHA), "sha256_prefix:", "good",
     "files[0].sha256_prefix", "8 to 63 hex"),
    ("hash", _swap(f"sha256: {SHA}", f"sha256: {SHA}, sha256_prefix: deadbeef"), "sha256_prefix:", "good",
     "files[0].sha256_prefix", "does not match"),
]


def _expected_line(text: str, marker: str | None) -> int | None:
    if marker is None:
        return None
    if marker.startswith("last:"):
        return max(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith(marker[5:]))
    return next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith(marker) or marker in ln
                and not ln.lstrip().startswith("#"))


@pytest.mark.parametrize("category,text,marker,entry,field,fragment", REGISTRY_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(REGISTRY_CASES)])
def test_hostile_registry_is_refused_naming_file_line_entry_field(tmp_path, category, text, marker, entry, field,
                                                                   fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError) as ei:
        Registry.from_file(path)
    err = ei.value
    assert fragment in str(err), str(err)
    assert err.file == str(path) and str(path) in str(err)
    assert err.entry == entry and err.field == field, (err.entry, err.field, str(err))
    line = _expected_line(text, marker)
    if line is not None:
        assert err.line == line, (err.line, line, str(err))
        assert f"{path}:{line}" in str(err)
    # the same file through the CLI: non-zero exit, one line naming file:line, entry and field, nothing on stdout
    result = CliRunner().invoke(cli, ["list", "--registry", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    msg = one_line(result.stderr)
    assert msg.startswith("hubload: error: RegistryError:") and fragment in msg
    assert (f"{path}:{line}" if line else str(path)) in msg
    if entry:
        assert f"model {entry!r}" in msg
    if field:
        assert f"field {field!r}" in msg


def test_registry_cli_as_a_real_subprocess_and_non_utf8(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_swap("path: model.safetensors", "path: ../../x.safetensors"))
    proc = run_cli("list", "--registry", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{bad}:6, model 'good', field 'files[0].path'" in one_line(proc.stderr)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe garbage \x80")
    proc = run_cli("list", "--registry", str(binary))
    assert proc.returncode == 2 and str(binary) in one_line(proc.stderr) and "cannot read" in proc.stderr


def test_yaml_python_tags_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (f"!!python/object/apply:os.system ['touch {marker}']",
                    f"!!python/object/apply:builtins.open ['{marker}', 'w']"):
        with pytest.raises(RegistryError):
            parse_registry(f"version: 1\nmodels: {payload}\n", file="evil.yaml")
        with pytest.raises(RegistryError):
            parse_registry(f"version: 1\nmodels:\n  m: {payload}\n", file="evil.yaml")
    assert not marker.exists()


# --- parser robustness: each of these once slipped past the registry parser; hubload/_yaml.py refuses it ---

_BASE = f"version: 1\nmodels:\n  m:\n    source: https://e.com/\n    files: [{{path: a.npz, sha256: {SHA}}}]\n"


@pytest.mark.parametrize("extra", ["    description: !foo bar\n", "    description: !!python/name:os.system ''\n",
                                   "    config: {<<: {a: 1}}\n"])
def test_yaml_scalar_tags_are_registry_errors(extra, tmp_path):
    with pytest.raises(RegistryError) as ei:
        parse_registry(_BASE + extra, file="r.yaml")
    assert ei.value.line == 6


def test_recursive_yaml_alias_is_a_registry_error():
    with pytest.raises(RegistryError, match="alias"):
        parse_registry(_BASE + "    config: &c {self: *c}\n", file="r.yaml")


def test_billion_laughs_registry_is_refused_quickly():
    import signal

    text = _BASE + "    config:\n      l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        text += f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n"

    def too_slow(*_):
        raise TimeoutError("parse_registry is still expanding aliases after 3 s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(3)  # a guard against a hang, not a timing assertion: the fixed parser refuses at once
    try:
        with pytest.raises(RegistryError, match="alias|too many|nodes"):
            parse_registry(text, file="lol.yaml")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_version_must_be_the_integer_1(version):
    with pytest.raises(RegistryError, match="version"):
        parse_registry(f"version: {version}\nmodels: {{}}\n")


# ================================================================ file:// sources with escaping symlinks


def _file_registry(src: Path, path: str, sha: str) -> dict:
    return {"version": 1, "models": {"local": {"source": f"file://{src}", "files": [{"path": path, "sha256": sha}]}}}


@pytest.mark.parametrize("how", ["file-link", "folder-link", "relative-link"])
def test_symlink_in_a_file_source_pointing_outside_is_refused(tmp_path, how):
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    _st(secret, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0\0\x80\x3f")
    sha = sha256_file(secret)  # the hash even matches: only the path check can refuse it
    src = tmp_path / "weights"
    src.mkdir()
    if how == "file-link":
        (src / "model.safetensors").symlink_to(secret)
        path = "model.safetensors"
    elif how == "folder-link":
        (src / "sub").symlink_to(secret.parent, target_is_directory=True)
        path = "sub/secret.safetensors"
    else:
        (src / "model.safetensors").symlink_to(os.path.relpath(secret, src))
        path = "model.safetensors"
    reg = _file_registry(src, path, sha)
    with pytest.raises(RegistryError, match="outside the source folder") as ei:
        pull("local", registry=reg)
    assert "local" in str(ei.value) and str(secret) in str(ei.value)
    with pytest.raises(RegistryError, match="outside"):
        hubload.inspect("local", registry=reg)
    assert cache_is_empty(Path(os.environ["HUBLOAD_CACHE"]))


def test_symlink_inside_the_source_folder_is_fine(tmp_path):
    src = tmp_path / "weights"
    src.mkdir()
    real = _st(src / "real.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
               b"\0\0\x80\x3f")
    (src / "model.safetensors").symlink_to("real.safetensors")
    files = pull("local", registry=_file_registry(src, "model.safetensors", sha256_file(real)))
    assert files["model.safetensors"].read_bytes() == real.read_bytes()


# ============================================================================ property-based tests (new)


@st.composite
def keras_model_tensors(draw):
    """A random Keras-layout model: layer name -> (leaf, shape, layer kind), every rule represented."""
    out = {}
    kinds = {}
    for i, rule in enumerate(draw(st.lists(st.sampled_from(KERAS_RULES), min_size=1, max_size=8))):
        ndim = rule.ndim if rule.ndim is not None else draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim)))
        layer = f"layer{i}"
        native = f"{layer}/{rule.keras_leaf}"
        out[native] = TensorInfo(native, shape, "float32", 4 * int(np.prod(shape)))
        kind = {"depthwise-conv1d-kernel": "depthwise_conv1d", "depthwise-conv2d-kernel": "depthwise_conv2d",
                "conv1d-transpose-kernel": "conv1d_transpose", "conv2d-transpose-kernel": "conv2d_transpose",
                "conv3d-transpose-kernel": "conv3d_transpose"}.get(rule.name)
        if kind:
            kinds[native] = kind
    return out, kinds


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keras_model_tensors())
def test_whole_model_keras_to_canonical_and_back_is_identity(case):
    """to_canonical over a whole random model, then from_canonical: same names, same data, every rule."""
    tensors, kinds = case
    canon = to_canonical(tensors, "keras", layer_kinds=kinds)
    assert len(canon) == len(tensors)
    by_source = {c.source: c for c in canon.values()}
    hints = {c.canonical: c.source.rsplit("/", 1)[1] for c in canon.values()}
    back = from_canonical(canon, hints, keras_shapes={c.canonical: tensors[c.source].shape for c in canon.values()},
                          layer_kinds={by_source[n].canonical: k for n, k in kinds.items()})
    rng = np.random.default_rng(0)
    for native, info in tensors.items():
        c = by_source[native]
        keras_path, inv, _ = back[c.canonical]
        assert keras_path == native
        data = rng.standard_normal(info.shape).astype(np.float32)
        there = c.transform.apply(data) if c.transform else data
        assert tuple(there.shape) == c.shape
        again = inv.apply(there) if inv else there
        np.testing.assert_array_equal(again, data)


_yaml_token = st.sampled_from([
    "version: 1\n", "models:\n", "  m:\n", "    source: https://e.com/\n", "    files: [{path: a.npz, sha256: "
    + SHA + "}]\n", "    config: ", "&a ", "*a", "!foo ", "!!python/name:os.system ", "!!binary ", "<<: ", "{", "}",
    "[", "]", ", ", "- ", "x", "1", "~", "'q'", "\"\\0\"", ": ", "\n", "  ", "? ", "|\n", "%YAML 1.1\n---\n",
])


@settings(max_examples=300, deadline=None)
@example("version: 1\nmodels:\n  m: !foo x\n")
@example("a: &a [*a]\n")
@given(st.lists(_yaml_token, max_size=25).map("".join))
def test_registry_parser_on_yaml_shaped_noise_raises_only_registry_error(text):
    """Grammar-shaped noise (anchors, aliases, tags, flow/block mixes) reaches deeper than random text."""
    try:
        parse_registry(text, file="noise.yaml")
    except RegistryError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list("ab./\\:~\0\n") + ["..", "C:", "%2e", "./", "/"]), min_size=1, max_size=12)
       .map("".join))
def test_archive_names_are_safe_or_refused(name):
    """Any tar member name either lands strictly inside the target folder or is refused."""
    from hubload.archive import _safe_name

    try:
        safe = _safe_name(name, "a.tar")
    except UnsafeArchiveError:
        return
    if safe == "":
        return
    root = "/extract/root"
    joined = os.path.normpath(os.path.join(root, safe))
    assert joined.startswith(root + "/") and "\\" not in safe and "\0" not in safe
    assert ".." not in safe.split("/")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "c\\d", "/x", "C:"]), min_size=1, max_size=5))
def test_cache_link_refuses_every_escaping_path(parts):
    """Cache.link either creates the link inside the snapshot folder or raises CacheError."""
    from hubload.errors import CacheError

    root = Path(os.environ["HUBLOAD_CACHE"])
    cache = Cache(root)
    blob_src = root.parent / "blob-src"
    blob_src.write_bytes(b"data")
    import hashlib

    sha = hashlib.sha256(b"data").hexdigest()
    tmp = cache.tmp_path(sha)
    tmp.write_bytes(b"data")
    cache.publish(tmp, sha)
    path = "/".join(parts)
    try:
        link = cache.link("m", None, path, sha)
    except CacheError:
        return
    snap = os.path.realpath(cache.snapshot_dir("m", None))
    assert os.path.realpath(link.parent).startswith(snap)
    assert os.path.commonpath([os.path.abspath(link), snap]) == snap


def test_file_source_with_a_host_is_refused():
    with pytest.raises(RegistryError, match="source"):
        parse_registry(_swap("source: https://example.com/w/", "source: file://relative/dir"))


def test_public_pull_is_the_function_after_internal_imports():
    code = ("import hubload, hubload.resolve, hubload.fetch, hubload.relayout, hubload.api\n"
            "assert callable(hubload.pull) and callable(hubload.convert), (hubload.pull, hubload.convert)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
