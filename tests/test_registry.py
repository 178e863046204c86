"""Registry parsing, validation, layering and lookup."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubload.errors import ModelNotFoundError, RegistryError
from hubload.registry import (
    Registry,
    builtin_registry_path,
    check_relative_path,
    load_registry,
    parse_registry,
)

SHA = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
COMMIT = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"

GOOD = textwrap.dedent(f"""\
    version: 1
    models:
      all-minilm-l6-v2:
        source: hf://sentence-transformers/all-MiniLM-L6-v2
        revision: {COMMIT}
        files:
          - {{path: model.safetensors, sha256: {SHA}, size: 90868376}}
        format: safetensors
        layout: torch
        architecture: {{torch: "transformers:BertModel", tf: "keras_hub.models:BertBackbone"}}
        config: {{hidden_size: 384}}
        license: apache-2.0
        description: MiniLM
    """)


def write(tmp_path: Path, text: str, name: str = "reg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_registry_parses_every_field():
    e = parse_registry(GOOD)["all-minilm-l6-v2"]
    assert e.scheme == "hf" and e.repo_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert e.revision == COMMIT and e.pinned and not e.weakly_pinned
    assert e.files[0].sha256 == SHA and e.files[0].size == 90868376
    assert e.frameworks() == ["tf", "torch"]
    assert e.config == {"hidden_size": 384}
    assert e.file_url("model.safetensors") == "hf://sentence-transformers/all-MiniLM-L6-v2/model.safetensors"


@pytest.mark.parametrize("old,new,field,fragment", [
    ("format: safetensors", "format: safetensors\n    colour: red", "colour", "unknown key"),
    ("format: safetensors", "format: pickle", "format", "unknown format"),
    ("layout: torch", "layout: jax", "layout", "unknown layout"),
    (f"sha256: {SHA}", f"sha256: {SHA[:-1]}", "files[0].sha256", "64 hex"),
    (f"sha256: {SHA}", f"sha256: {SHA}0", "files[0].sha256", "64 hex"),
    ("size: 90868376", "size: -1", "files[0].size", "non-negative"),
    ("size: 90868376", "size: big", "files[0].size", "non-negative"),
    ("path: model.safetensors", "path: ../../etc/passwd", "files[0].path", "escape"),
    ("path: model.safetensors", "path: /etc/passwd", "files[0].path", "absolute"),
    ("path: model.safetensors", "path: 'a\\\\b.bin'", "files[0].path", "backslash"),
    ("path: model.safetensors", "path: a//b", "files[0].path", "empty"),
    ("source: hf://sentence-transformers/all-MiniLM-L6-v2", "source: ftp://example.com/x", "source", "not allowed"),
    ("source: hf://sentence-transformers/all-MiniLM-L6-v2", "source: javascript:alert(1)", "source", "not allowed"),
    ("source: hf://sentence-transformers/all-MiniLM-L6-v2", "source: https://user:pw@example.com/x", "source",
     "credentials"),
    ("source: hf://sentence-transformers/all-MiniLM-L6-v2", "source: hf://../../x", "source", "Hub repository"),
    ("config: {hidden_size: 384}", "config: [1, 2]", "config", "mapping"),
    ('torch: "transformers:BertModel"', 'jax: "x:y"', "architecture.jax", "unknown framework"),
    ('torch: "transformers:BertModel"', 'torch: "no-colon"', "architecture.torch", "module:callable"),
])
def test_bad_fields_name_file_entry_field_and_line(old, new, field, fragment):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    with pytest.raises(RegistryError) as ei:
        parse_registry(text, file="reg.yaml")
    err = ei.value
    assert err.file == "reg.yaml" and err.entry == "all-minilm-l6-v2" and err.field == field
    assert fragment in str(err) and err.line and err.line >= 3
    assert "reg.yaml:" in str(err) and "all-minilm-l6-v2" in str(err)


def test_missing_required_fields():
    with pytest.raises(RegistryError, match="missing required field 'files'"):
        parse_registry("version: 1\nmodels:\n  x:\n    source: https://e.com/\n")
    with pytest.raises(RegistryError, match="missing 'version: 1'"):
        parse_registry("models: {}\n")
    with pytest.raises(RegistryError, match="unsupported version 2"):
        parse_registry("version: 2\nmodels: {}\n")


def test_duplicate_ids_and_not_yaml_and_wrong_types():
    dup = GOOD + GOOD.split("models:\n", 1)[1]
    with pytest.raises(RegistryError, match="duplicate key 'all-minilm-l6-v2'") as ei:
        parse_registry(dup, file="r.yaml")
    assert ei.value.line == 14
    with pytest.raises(RegistryError, match="not valid YAML"):
        parse_registry("version: 1\nmodels: [\n")
    with pytest.raises(RegistryError, match="top level must be a mapping"):
        parse_registry("- 1\n- 2\n")
    with pytest.raises(RegistryError, match="'models' must be a mapping"):
        parse_registry("version: 1\nmodels: [a]\n")
    with pytest.raises(RegistryError, match="empty"):
        parse_registry("")


def test_a_json_registry_parses_like_its_yaml_and_errors_keep_their_lines():
    """JSON is YAML: the same document as JSON gives the same entries (read without PyYAML), a duplicate key is
    still refused, and an error still names its line."""
    import json
    import subprocess
    import sys

    import yaml

    as_json = json.dumps(yaml.safe_load(GOOD), indent=1)
    assert parse_registry(as_json, file="r.yaml") == parse_registry(GOOD, file="r.yaml")
    code = ("import sys; from hubload.registry import parse_registry; "
            "parse_registry(sys.stdin.read()); print('yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=as_json, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    dup = '{"version": 1, "models": {"a": {"source": "x"},\n "a": {"source": "y"}}}'
    with pytest.raises(RegistryError, match="duplicate key 'a'") as ei:
        parse_registry(dup, file="r.json")
    assert ei.value.line == 2
    bad = as_json.replace('"size": 90868376', '"size": -5')
    assert bad != as_json
    with pytest.raises(RegistryError) as ei:
        parse_registry(bad, file="r.json")
    assert ei.value.line and ei.value.field and "size" in ei.value.field


def test_the_builtin_layer_is_parsed_only_when_an_id_is_not_found_above_it(tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    reg = write(tmp_path, json.dumps(yaml.safe_load(GOOD.replace("all-minilm-l6-v2", "mine"))), "r.json")
    code = ("import sys; from hubload.registry import load_registry; r = load_registry(sys.argv[1]); "
            "r.get('mine'); print('yaml' in sys.modules); r.get('all-minilm-l6-v2'); print('yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(reg)], capture_output=True, text=True, check=True,
                         env={**os.environ, "HUBLOAD_REGISTRY": "", "HUBLOAD_CONFIG_DIR": str(tmp_path / "cfg")})
    assert out.stdout.split() == ["False", "True"]  # the built-in entry is still found, after its parse
    assert {"mine", "all-minilm-l6-v2"} <= set(load_registry(reg).ids())


def test_url_sources_need_a_hash_but_hf_may_use_the_hubs():
    hf = "version: 1\nmodels:\n  a:\n    source: hf://o/n\n    files: [{path: model.safetensors}]\n"
    e = parse_registry(hf)["a"]
    assert not e.pinned and e.weakly_pinned and e.format == "safetensors"
    url = hf.replace("hf://o/n", "https://example.com/w/")
    with pytest.raises(RegistryError, match="must be verified by a hash"):
        parse_registry(url)


def test_prefix_only_file_is_weakly_pinned_and_checked_against_full():
    text = ("version: 1\nmodels:\n  r:\n    source: https://download.example.org/models/\n"
            "    files: [{path: resnet18-f37072fd.pth, sha256_prefix: f37072fd}]\n")
    e = parse_registry(text)["r"]
    assert e.format == "torch" and e.weakly_pinned and not e.pinned
    assert e.file_url(e.files[0].path) == "https://download.example.org/models/resnet18-f37072fd.pth"
    bad = text.replace("sha256_prefix: f37072fd", f"sha256_prefix: f37072fd, sha256: {SHA}")
    with pytest.raises(RegistryError, match="does not match sha256"):
        parse_registry(bad)


def test_relative_source_resolves_against_registry_folder(tmp_path):
    (tmp_path / "weights").mkdir()
    p = write(tmp_path, f"version: 1\nmodels:\n  m:\n    source: weights\n"
                        f"    files: [{{path: m.npz, sha256: {SHA}}}]\n")
    e = Registry.from_file(p).get("m")
    assert e.scheme == "file" and e.local_dir() == (tmp_path / "weights").resolve()


def test_unknown_id_suggests_close_ids():
    reg = Registry([("x", parse_registry(GOOD))])
    with pytest.raises(ModelNotFoundError) as ei:
        reg.get("all-minilm-l6")
    assert ei.value.suggestions == ["all-minilm-l6-v2"]
    assert "Did you mean: all-minilm-l6-v2" in str(ei.value)
    with pytest.raises(LookupError):
        reg.get("zzzzzz")


def test_layers_explicit_then_env_then_user_then_builtin(tmp_path, monkeypatch):
    def reg(mid: str, desc: str) -> str:
        return (f"version: 1\nmodels:\n  {mid}:\n    source: https://e.com/\n"
                f"    files: [{{path: a.safetensors, sha256: {SHA}}}]\n    description: {desc}\n")

    explicit = write(tmp_path, reg("shared", "explicit"), "explicit.yaml")
    env1 = write(tmp_path, reg("shared", "env") + "  only-env:\n    source: https://e.com/\n"
                 f"    files: [{{path: a.safetensors, sha256: {SHA}}}]\n", "env1.yaml")
    user_dir = tmp_path / "hubload-config"
    user_dir.mkdir(exist_ok=True)
    write(user_dir, reg("only-user", "user"), "registry.yaml")
    monkeypatch.setenv("HUBLOAD_REGISTRY", os.pathsep.join([str(env1)]))
    r = load_registry(explicit)
    assert r.get("shared").description == "explicit"
    assert r.get("only-env").description is None and r.get("only-user").description == "user"
    assert "all-minilm-l6-v2" in r  # the built-in layer is still there
    assert load_registry().get("shared").description == "env"
    assert r.layers[-1] == str(builtin_registry_path())


def test_builtin_registry_is_valid_and_pinned():
    reg = load_registry()
    e = reg.get("all-minilm-l6-v2")
    assert e.files[0].sha256 == SHA and e.revision == COMMIT and e.pinned
    for entry in reg:
        assert entry.files, entry.id
        for f in entry.files:
            assert f.sha256 or f.sha256_prefix or entry.scheme == "hf"


def test_parsed_files_are_memoised_until_they_change(tmp_path):
    p = write(tmp_path, GOOD)
    a = Registry.from_file(p).get("all-minilm-l6-v2")
    assert Registry.from_file(p).get("all-minilm-l6-v2") is a
    p.write_text(GOOD.replace("description: MiniLM", "description: changed, longer"))
    assert Registry.from_file(p).get("all-minilm-l6-v2").description == "changed, longer"


# ------------------------------------------------------------------ property tests

_segment = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="/\\"),
                   min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))


@given(st.lists(_segment, min_size=1, max_size=5))
def test_safe_relative_paths_stay_inside_their_folder(parts):
    path = "/".join(parts)
    if len(path) >= 2 and path[1] == ":" and path[0].isalpha():  # "C:x" is a Windows drive path: refused by design
        with pytest.raises(ValueError, match="absolute"):
            check_relative_path(path)
        return
    assert check_relative_path(path) == path
    base = Path("/base/dir")
    assert os.path.normpath(base / path).startswith(str(base) + os.sep)


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "c\\d", "/"]), min_size=1, max_size=6))
def test_any_escaping_path_is_refused(parts):
    path = "/".join(parts)
    escapes = path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")) or "\\" in path
    if escapes:
        with pytest.raises(ValueError):
            check_relative_path(path)
    else:
        assert check_relative_path(path) == path


_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.floats(allow_nan=False))
_yamlish = st.recursive(_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), c, max_size=4)),
                        max_leaves=20)


@settings(max_examples=200)
@given(_yamlish)
def test_parser_never_crashes_on_arbitrary_documents(doc):
    """Any document either parses or raises RegistryError - never another exception."""
    try:
        parse_registry({"version": 1, "models": {"m": doc}} if isinstance(doc, dict) else doc)
    except RegistryError:
        pass


@settings(max_examples=100)
@given(st.text(max_size=200))
def test_parser_never_crashes_on_arbitrary_text(text):
    try:
        parse_registry(text)
    except RegistryError:
        pass
