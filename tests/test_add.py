"""``hubload add``: a Hub repo becomes a complete, validated, pinned registry entry; each failure is one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hubload import config
from hubload.cli import cli
from hubload.registry import Registry, parse_registry
from tests.servers import MINILM_COMMIT, MINILM_REPO_ID, MINILM_SHA256, MINILM_SIZE

C1 = "a" * 40


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def hub(minilm_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    return minilm_hub


def test_add_minilm_writes_a_pinned_entry_into_the_user_registry(hub) -> None:
    r = run("add", f"hf://{MINILM_REPO_ID}")
    assert r.exit_code == 0, r.output
    path = config.user_registry_path()
    text = path.read_text()
    entry = parse_registry(text, file=str(path))["all-minilm-l6-v2"]
    assert entry.pinned and entry.revision == MINILM_COMMIT
    assert entry.files[0].sha256 == MINILM_SHA256 and entry.files[0].size == MINILM_SIZE
    assert [f.path for f in entry.files] == ["model.safetensors", "config.json"]
    assert entry.format == "safetensors" and entry.layout == "torch"
    assert dict(entry.architecture) == {"torch": "transformers:BertModel", "tf": "keras_hub.models:BertBackbone"}
    assert entry.config["layer_norm_eps"] == 1e-12 and entry.config["model_type"] == "bert"
    assert f"from {hub.url}" in text and f"commit {MINILM_COMMIT}" in text  # provenance comment
    assert "all-minilm-l6-v2" in Registry.from_file(path)


def test_add_json_include_and_an_existing_id(hub) -> None:
    reg = config.user_registry_path().parent / "team.yaml"
    reg.parent.mkdir(parents=True, exist_ok=True)
    reg.write_text("# team models\nversion: 1\nmodels:\n  other:\n    # cited\n    source: hf://x/y\n"
                   f"    revision: {C1}\n    files:\n      - {{path: a.safetensors, sha256: {'b' * 64}, size: 1}}\n")
    r = run("add", f"hf://{MINILM_REPO_ID}@main", "--id", "minilm", "--registry", str(reg), "--json",
            "--include", "config.json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["ok"] and data["commit"] == MINILM_COMMIT and data["weights"]["paths"] == ["model.safetensors"]
    text = reg.read_text()
    assert text.startswith("# team models\n") and "    # cited\n" in text
    assert list(parse_registry(text)) == ["other", "minilm"]
    again = run("add", f"hf://{MINILM_REPO_ID}", "--id", "minilm", "--registry", str(reg))
    assert again.exit_code == 2 and "exists already" in again.output
    assert run("add", f"hf://{MINILM_REPO_ID}", "--id", "minilm", "--registry", str(reg), "--force").exit_code == 0
    assert list(parse_registry(reg.read_text())) == ["other", "minilm"]


@pytest.mark.parametrize(("source", "code", "words"), [
    ("hf://acme/none", 3, "no such repository"),
    (f"hf://{MINILM_REPO_ID}@no-such-branch", 3, "revision 'no-such-branch' not found"),
    ("hf://acme/gated", 4, "gated"),
    ("hf://acme/empty", 5, "no weight file"),
])
def test_add_failures_are_one_line_with_their_exit_code(hub, source, code, words, monkeypatch) -> None:
    hub.add_repo("acme/gated", gated=True, token="hf_do_not_print_me")
    hub.add_file("acme/gated", C1, "model.safetensors", b"\0" * 64)
    hub.add_file("acme/gated", C1, "config.json", b"{}", lfs=False)
    hub.add_file("acme/empty", C1, "README.md", b"hi", lfs=False)
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print_me") if "gated" not in source else None
    r = run("add", source)
    assert r.exit_code == code, r.output
    assert words in r.output and len(r.output.strip().splitlines()) == 1
    assert "hf_do_not_print_me" not in r.output
    j = run("add", source, "--json")
    assert j.exit_code == code and json.loads(j.output)["exit_code"] == code
    assert not config.user_registry_path().exists()  # nothing written


def test_add_refuses_a_malformed_source() -> None:
    r = run("add", "hf://just-a-name")
    assert r.exit_code == 2 and "hf://ORG/NAME" in r.output
