"""Shared fixtures: every test gets its own cache/config dirs and a clean HUBLOAD_*/HF_* environment."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.servers"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Point the cache, config and Hugging Face dirs at tmp_path and clear HUBLOAD_*/HF_* variables."""
    for key in list(os.environ):
        if key.startswith(("HUBLOAD_", "HF_")) or key in ("HUGGING_FACE_HUB_TOKEN",):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HUBLOAD_CACHE", str(tmp_path / "hubload-cache"))
    monkeypatch.setenv("HUBLOAD_CONFIG", str(tmp_path / "hubload-config"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield


class Sleeps:
    """A RetryPolicy sleep that records the delays instead of sleeping (tests count backoff, never time it)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    """A fresh sleep recorder for a RetryPolicy."""
    return Sleeps()
