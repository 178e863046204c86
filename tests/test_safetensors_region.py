"""``pread`` of a box of a safetensors tensor into a caller's buffer (what each rank of a sharded load reads)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from safetensors.numpy import save_file

from hubload.errors import CheckpointError
from hubload.safetensors_io import SafetensorsReader, region_runs


@pytest.fixture
def reader(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.random((5, 7, 3), dtype=np.float32), "b": np.arange(10, dtype=np.int64),
               "s": np.array(3.5, dtype=np.float32), "h": rng.random((6, 4)).astype(np.float16)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return SafetensorsReader(path), tensors


def _boxes(shape):
    """Every box of a small shape (all offsets and extents)."""
    ranges = [[(o, n) for o in range(d + 1) for n in range(d - o + 1)] for d in shape]
    for combo in itertools.product(*ranges):
        yield tuple(o for o, _ in combo), tuple(n for _, n in combo)


@pytest.mark.parametrize("name", ["a", "b", "h"])
def test_every_box_reads_exactly_that_slice(reader, name):
    r, tensors = reader
    want = tensors[name]
    for offset, shape in _boxes(want.shape):
        out = np.full(shape, 99, dtype=want.dtype)
        r.read_region(name, offset, shape, out)
        np.testing.assert_array_equal(out, want[tuple(slice(o, o + n) for o, n in zip(offset, shape))])


def test_scalar(reader):
    r, _ = reader
    out = np.empty((), dtype=np.float32)
    r.read_region("s", (), (), out)
    assert out == np.float32(3.5)


def test_runs_merge_whole_trailing_dims():
    # rows 1..2 of a [5, 7, 3] float32: one run of 2*7*3*4 bytes
    assert region_runs((5, 7, 3), 4, (1, 0, 0), (2, 7, 3)) == (168, [84])
    # a column block of a matrix: one run per row
    assert region_runs((4, 8), 2, (0, 4), (4, 4)) == (8, [8, 24, 40, 56])
    assert region_runs((4, 8), 2, (0, 0), (0, 8)) == (0, [])


def test_bad_box_or_buffer_is_a_checkpoint_error(reader):
    r, _ = reader
    with pytest.raises(CheckpointError, match="outside"):
        r.read_region("a", (4, 0, 0), (2, 7, 3), np.empty((2, 7, 3), np.float32))
    with pytest.raises(CheckpointError, match="buffer holds"):
        r.read_region("a", (0, 0, 0), (1, 7, 3), np.empty((2, 7, 3), np.float32))
    with pytest.raises(CheckpointError, match="no tensor"):
        r.read_region("zz", (0,), (1,), np.empty(1, np.float32))


def test_truncated_file_is_named(reader, tmp_path):
    r, _ = reader
    data = r.path.read_bytes()
    r.path.write_bytes(data[:-40])  # the header still claims the full data section
    with pytest.raises(CheckpointError, match="truncated"):
        r.read_region("h", (0, 0), (6, 4), np.empty((6, 4), np.float16))
