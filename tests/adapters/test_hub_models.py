"""Real all-MiniLM-L6-v2 from the local Hub: an entry written by ``hubload add`` and the bare ``hf://`` source
load into transformers' BertModel (torch) and keras-hub's BertBackbone (TF) and match BertModel within 1e-4;
a warm load pinned to a commit makes no request at all. The same file loaded by path into models built from its
config.json (``hf_families.build``) matches ``BertModel.from_pretrained``, token types and pooler included."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")
transformers = pytest.importorskip("transformers")
import json  # noqa: E402

from click.testing import CliRunner  # noqa: E402

import hubload  # noqa: E402
from hubload.adapters import hf_families  # noqa: E402
from hubload.cli import cli  # noqa: E402
from tests.servers import MINILM_COMMIT, MINILM_REPO_ID  # noqa: E402

IDS = np.array([[101, 7592, 2088, 2003, 102, 0, 0], [101, 2023, 102, 0, 0, 0, 0]])
MASK = (IDS != 0).astype("int64")


@pytest.fixture(scope="module")
def reference(minilm_file):
    model = transformers.BertModel.from_pretrained(str(minilm_file.parent)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()


def _torch(model) -> np.ndarray:
    assert type(model) is transformers.BertModel
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()


def _keras(model) -> np.ndarray:
    import keras_hub

    assert isinstance(model, keras_hub.models.BertBackbone)
    out = model({"token_ids": IDS.astype("int32"), "segment_ids": np.zeros_like(IDS, dtype="int32"),
                 "padding_mask": MASK.astype(bool)})
    return np.asarray(out["sequence_output"])


def _close(got: np.ndarray, want: np.ndarray) -> None:
    keep = MASK.astype(bool)  # padded positions are undefined
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4, rtol=0)


def test_added_entry_and_bare_source_match_bertmodel_in_both_frameworks(minilm_hub, monkeypatch,
                                                                        reference) -> None:
    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    r = CliRunner().invoke(cli, ["add", f"hf://{MINILM_REPO_ID}", "--id", "minilm"])
    assert r.exit_code == 0, r.output
    _close(_torch(hubload.load("minilm", framework="torch")), reference)
    _close(_keras(hubload.load("minilm", framework="tf")), reference)

    bare = f"hf://{MINILM_REPO_ID}@{MINILM_COMMIT}"
    _close(_keras(hubload.load(bare, framework="tf")), reference)
    minilm_hub.reset_log()
    _close(_torch(hubload.load(bare, framework="torch")), reference)
    assert minilm_hub.requests == []  # resolution and bytes both come from the cache


def test_bare_branch_source_says_to_pin_it(minilm_hub, monkeypatch, caplog) -> None:
    monkeypatch.setenv("HF_ENDPOINT", minilm_hub.url)
    report = hubload.check(f"hf://{MINILM_REPO_ID}", framework="torch")
    assert report.ok
    assert any("hubload add" in rec.getMessage() and rec.levelname == "WARNING" for rec in caplog.records)


def test_file_into_models_built_from_config_matches_from_pretrained_with_token_types_and_pooler(minilm_file) -> None:
    import keras_hub

    config = json.loads((minilm_file.parent / "config.json").read_text())
    types = np.zeros_like(IDS)
    types[:, 2:] = 1  # segment 1 on later tokens: the token-type table is used, not only its row 0
    ref_model = transformers.BertModel.from_pretrained(str(minilm_file.parent)).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                        token_type_ids=torch.tensor(types))

    pt, report = hubload.load(minilm_file, model=hf_families.build(transformers.BertModel, config),
                              return_report=True)
    assert report.ok and [i.key for i in report.ignored] == ["embeddings.position_ids"]
    with torch.no_grad():
        got = pt(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), token_type_ids=torch.tensor(types))
    _close(got.last_hidden_state.numpy(), ref.last_hidden_state.numpy())
    np.testing.assert_allclose(got.pooler_output.numpy(), ref.pooler_output.numpy(), atol=1e-5, rtol=0)

    kb, report = hubload.load(minilm_file, model=hf_families.build(keras_hub.models.BertBackbone, config),
                              return_report=True)
    assert report.ok and len(report.matched) == 103  # every tensor but position_ids, the pooler included
    out = kb({"token_ids": IDS.astype("int32"), "segment_ids": types.astype("int32"),
              "padding_mask": MASK.astype(bool)})
    _close(np.asarray(out["sequence_output"]), ref.last_hidden_state.numpy())
    np.testing.assert_allclose(np.asarray(out["pooled_output"]), ref.pooler_output.numpy(), atol=1e-4, rtol=0)
    # the segment ids change the numbers, so the comparison covers the token-type table
    assert np.abs(ref.last_hidden_state.numpy() - _torch(pt)).max() > 1e-3
