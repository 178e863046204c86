"""``hubload lock``: pin branch/tag entries and missing sha256/size in place, keeping comments and order;
``--check`` guards CI; ``pull --frozen`` refuses what is not pinned."""

from __future__ import annotations

import json

from click.testing import CliRunner

from hubload.cli import cli
from hubload.registry import parse_registry
from tests.servers import MINILM_COMMIT, MINILM_REPO_ID, MINILM_SHA256, MINILM_SIZE

LOOSE = f"""# Our models. Keep this comment.
version: 1
models:
  # the small encoder
  minilm:
    source: hf://{MINILM_REPO_ID}
    revision: main   # moves!
    files:
      # weights only
      - {{path: model.safetensors}}
      - path: config.json
    format: safetensors

  pinned-already:
    source: hf://{MINILM_REPO_ID}
    revision: {MINILM_COMMIT}
    files:
      - {{path: model.safetensors, sha256: {MINILM_SHA256}, size: {MINILM_SIZE}}}
"""


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_check_lists_unpinned_entries_and_lock_pins_them(minilm_hub, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    reg = tmp_path / "models.yaml"
    reg.write_text(LOOSE)
    check = run("lock", "--check", str(reg))
    assert check.exit_code == 1
    assert "minilm" in check.output and "branch or tag" in check.output and "no sha256" in check.output
    assert "pinned-already" not in check.output
    assert reg.read_text() == LOOSE  # --check changes nothing

    frozen = run("pull", "minilm", "--registry", str(reg), "--frozen")
    assert frozen.exit_code == 2 and "not pinned" in frozen.output and "hubload lock" in frozen.output

    locked = run("lock", str(reg), "--json")
    assert locked.exit_code == 0, locked.output
    assert json.loads(locked.output)["entries"][0]["pinned"]["revision"] == MINILM_COMMIT
    text = reg.read_text()
    for kept in ("# Our models. Keep this comment.", "  # the small encoder", "      # weights only",
                 "(was main)"):
        assert kept in text
    entries = parse_registry(text)
    assert list(entries) == ["minilm", "pinned-already"]
    e = entries["minilm"]
    assert e.pinned and e.revision == MINILM_COMMIT and e.format == "safetensors"
    assert (e.files[0].sha256, e.files[0].size) == (MINILM_SHA256, MINILM_SIZE)
    assert e.files[1].path == "config.json" and e.files[1].sha256 and e.files[1].size
    assert text.split("pinned-already:")[1] == LOOSE.split("pinned-already:")[1]  # untouched entry

    assert run("lock", "--check", str(reg)).exit_code == 0
    minilm_hub.reset_log()
    assert run("lock", str(reg)).exit_code == 0 and not minilm_hub.requests  # nothing left to resolve


def test_lock_refuses_a_hash_the_hub_contradicts(minilm_hub, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    reg = tmp_path / "models.yaml"
    text = LOOSE.replace("{path: model.safetensors}", "{path: model.safetensors, sha256: " + "f" * 64 + "}")
    reg.write_text(text)
    r = run("lock", str(reg))
    assert r.exit_code == 2 and "differs from the Hub" in r.output
    assert reg.read_text() == text
