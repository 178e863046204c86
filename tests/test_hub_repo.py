"""hubload.hub_repo: a Hub repo → the files, weights and pins of a registry entry, from the Hub's metadata."""

from __future__ import annotations

import hashlib
import json

import pytest
import requests

from hubload.cache import Cache
from hubload.errors import AccessDeniedError, ModelNotFoundError, NoWeightsError
from hubload.hub_repo import RepoFile, RepoSnapshot, choose_weights, repo_snapshot, resolve_repo
from tests.servers import MINILM_COMMIT, MINILM_REPO_ID, MINILM_SHA256, MINILM_SIZE

C1 = "c" * 40


def _snap(*paths: str) -> RepoSnapshot:
    return RepoSnapshot("acme/m", "main", C1, tuple(RepoFile(p, 10, None) for p in paths))


@pytest.mark.parametrize(("paths", "want", "fmt"), [
    (("model.safetensors", "pytorch_model.bin", "tf_model.h5"), ("model.safetensors",), "safetensors"),
    (("pytorch_model.bin", "tf_model.h5", "config.json"), ("pytorch_model.bin",), "torch"),
    (("tf_model.h5", "config.json"), ("tf_model.h5",), "keras-weights"),
])
def test_weights_prefer_safetensors_then_torch_then_h5(paths, want, fmt) -> None:
    choice = choose_weights(_snap(*paths))
    assert choice.paths == want and choice.format == fmt
    assert want[0] in choice.reason


def test_sharded_index_takes_all_its_shards_or_refuses() -> None:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    snap = _snap("model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors")
    choice = choose_weights(snap, read_index=lambda p: index)
    assert choice.paths == ("model.safetensors.index.json", "model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors")
    with pytest.raises(NoWeightsError, match="model-00002-of-00002"):
        choose_weights(_snap("model.safetensors.index.json", "model-00001-of-00002.safetensors"),
                       read_index=lambda p: index)


def test_no_weights_lists_what_the_repo_holds() -> None:
    with pytest.raises(NoWeightsError, match="README.md"):
        choose_weights(_snap("README.md", "config.json"))


def test_minilm_resolves_to_its_pinned_commit_and_hash(minilm_hub, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    cache = Cache()
    res = resolve_repo(MINILM_REPO_ID, cache=cache)
    assert res.commit == MINILM_COMMIT and res.format == "safetensors" and res.layout == "torch"
    weights, cfg = res.files
    assert weights == {"path": "model.safetensors", "sha256": MINILM_SHA256, "size": MINILM_SIZE}
    body = requests.get(minilm_hub.url_for(MINILM_REPO_ID, MINILM_COMMIT, "config.json"), timeout=10).content
    assert cfg == {"path": "config.json", "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    assert cache.has_blob(cfg["sha256"], cfg["size"])  # hashed once, kept verified in the cache
    assert res.architecture == {"torch": "transformers:BertModel", "tf": "keras_hub.models:BertBackbone"}
    assert res.config["hidden_size"] == 384 and "_name_or_path" not in res.config
    # The weights were never downloaded: the metadata, config.json and one header Range only.
    minilm_hub.wait_idle()
    gets = [r for r in minilm_hub.requests if r.path.endswith("model.safetensors")]
    assert gets and all(r.range for r in gets) and sum(r.bytes_sent for r in gets) < 100_000


def test_hub_errors_are_typed(hub_server, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    hub_server.add_repo("acme/gated", gated=True, token="hf_secret_gated")
    hub_server.add_file("acme/gated", C1, "model.safetensors", b"x" * 16)
    hub_server.add_repo("acme/private", private=True, token="hf_secret_private")
    hub_server.add_file("acme/private", C1, "model.safetensors", b"x" * 16)
    with pytest.raises(ModelNotFoundError, match="no such repository"):
        repo_snapshot("acme/none")
    with pytest.raises(ModelNotFoundError, match="revision 'v9' not found"):
        repo_snapshot("acme/gated", "v9")
    with pytest.raises(ModelNotFoundError, match="private"):
        repo_snapshot("acme/private")
    assert repo_snapshot("acme/private", token="hf_secret_private").commit == C1
    # A gated repo's metadata is public (as on the Hub); its files are not.
    assert repo_snapshot("acme/gated").gated
    hub_server.add_file("acme/gated", C1, "config.json", b"{}", lfs=False)
    with pytest.raises(AccessDeniedError, match="gated") as info:
        resolve_repo("acme/gated")
    assert "hf_secret" not in str(info.value)


def test_look_alike_speaks_the_hub_json_shapes(minilm_hub) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=minilm_hub.url, token=False)
    info = api.model_info(MINILM_REPO_ID, files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings}
    assert sib["model.safetensors"].lfs.sha256 == MINILM_SHA256 and sib["config.json"].lfs is None
    tree = {f.path: f for f in api.list_repo_tree(MINILM_REPO_ID)}
    assert tree["model.safetensors"].lfs.sha256 == MINILM_SHA256  # tree[].lfs.oid
    paths = api.get_paths_info(MINILM_REPO_ID, ["model.safetensors", "config.json", "nope"], revision="main")
    assert sorted(p.path for p in paths) == ["config.json", "model.safetensors"]
    r = requests.get(f"{minilm_hub.url}/api/models/{MINILM_REPO_ID}/revision/main", timeout=10)
    assert r.headers["X-Repo-Commit"] == MINILM_COMMIT and json.loads(r.text)["sha"] == MINILM_COMMIT
