"""The error tree: every public error survives pickle with its type, message and attributes."""

from __future__ import annotations

import inspect
import pickle

import pytest

import hubload
from hubload import errors
from hubload.compat import CompatReport

# One instance of every public error class, built the way hubload builds them.
EXAMPLES = {
    "HubloadError": lambda: errors.HubloadError("plain"),
    "RegistryError": lambda: errors.RegistryError("bad field", file="r.yaml", entry="m", field="files", line=3),
    "ModelNotFoundError": lambda: errors.ModelNotFoundError("unknown model 'x'", model_id="x", suggestions=["y"]),
    "DownloadError": lambda: errors.DownloadError("reset", url="https://h/f", model_id="m"),
    "HashMismatchError": lambda: errors.HashMismatchError("bad bytes", url="u", expected="aa", actual="bb", path="p"),
    "AccessDeniedError": lambda: errors.AccessDeniedError("gated repo, no token", url="https://h/api/models/o/n"),
    "NoWeightsError": lambda: errors.NoWeightsError("no weight file in o/n", model_id="o/n"),
    "OfflineError": lambda: errors.OfflineError("offline miss", url="u"),
    "CacheError": lambda: errors.CacheError("read-only cache"),
    "CheckpointError": lambda: errors.CheckpointError("truncated"),
    "UnsafeCheckpointError": lambda: errors.UnsafeCheckpointError("pickle global"),
    "UnsafeArchiveError": lambda: errors.UnsafeArchiveError("escapes", archive="a.zip", member="../x"),
    "IncompatibleWeightsError": lambda: errors.IncompatibleWeightsError(
        "does not fit", report=CompatReport(source="s", target="t", missing=["a.weight"])),
    "MissingDependencyError": lambda: errors.MissingDependencyError("the 'torch' adapter", "torch", detail="no torch"),
    "UsageError": lambda: errors.UsageError("dtype='float13' is not a dtype"),
}


def test_every_public_error_has_an_example():
    public = {n for n, obj in vars(errors).items()
              if inspect.isclass(obj) and issubclass(obj, BaseException) and not n.startswith("_")}
    assert public == set(EXAMPLES) == set(errors.__all__)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_error_survives_pickle_when_raised(name):
    with pytest.raises(getattr(errors, name)) as info:
        raise EXAMPLES[name]()
    exc = info.value
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc) and back.args == exc.args
    plain = {k: v for k, v in vars(exc).items() if k != "report"}
    assert {k: v for k, v in vars(back).items() if k != "report"} == plain
    if name == "IncompatibleWeightsError":
        assert back.report.missing == ["a.weight"]


def test_usage_error_is_a_value_error_in_the_tree():
    assert issubclass(hubload.UsageError, hubload.HubloadError)
    assert issubclass(hubload.UsageError, ValueError)
