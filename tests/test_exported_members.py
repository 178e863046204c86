"""The public API in hubload/__init__.py: ``__all__`` is sorted, complete and every name resolves."""

from __future__ import annotations

import subprocess
import sys

import hubload


def test_all_is_sorted_and_resolves():
    assert hubload.__all__ == sorted(hubload.__all__)
    for name in hubload.__all__:
        assert getattr(hubload, name) is not None, name


def test_every_public_attribute_is_exported():
    public = {n for n in dir(hubload) if not n.startswith("_")} - {"annotations", "logging", "TYPE_CHECKING", "Any"}
    # submodules imported as a side effect of attribute access are not API
    public = {n for n in public if not isinstance(getattr(hubload, n), type(sys))}
    assert public <= set(hubload.__all__), public - set(hubload.__all__)


def test_errors_share_one_root():
    for name in hubload.__all__:
        obj = getattr(hubload, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, hubload.HubloadError), name


def test_lazy_api_does_not_import_frameworks_until_used():
    code = ("import sys, hubload; hubload.load; hubload.pull; hubload.check; hubload.Cache; "
            "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
