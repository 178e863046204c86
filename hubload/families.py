"""Model families: a Hub ``config.json``'s ``model_type`` → the library classes that build it.

This table is data and imports no framework. Each family names

- the **transformers** class (torch side), built from the config with no download: the weights come from
  hubload's verified cache, and a transformers model's ``state_dict`` names are the Hub checkpoint's names,
  so the torch adapter's generic spec lines them up;
- the **keras-hub** backbone (Keras side), built from the config by keras-hub's own converter module
  (``keras_hub/src/utils/transformers/convert_<family>.py``: ``convert_backbone_config`` for the config,
  ``convert_weights`` for the mapping between the Hub's names and the backbone's variables).

Registry syntax for these classes (``architecture:``)::

    architecture: {torch: "transformers:BertModel", tf: "keras_hub.models:BertBackbone"}
    config: {model_type: bert, hidden_size: 384, ...}     # the repo's config.json, as transformers reads it

A library class listed here is built from ``config`` as a Hugging Face ``config.json`` (transformers:
``<Family>Config(**config)``; keras-hub: the converter's ``convert_backbone_config``), not called with
``config`` as keywords. Any other ``module:callable`` keeps the keyword-call meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["FAMILIES", "Family", "architecture_for", "family_for_class", "family_for_config", "family_ignore",
           "family_model_spec", "family_renames"]


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: The family (``bert``).
        model_types: ``config.json`` ``model_type`` values it covers.
        torch: ``module:Class`` of the transformers model.
        config_class: ``module:Class`` of the transformers config.
        keras: ``module:Class`` of the keras-hub backbone.
        converter: The keras-hub converter module (config conversion + name mapping).
        torch_output: How to call the torch model for the family's sequence output (for docs and tests):
            ``"base"`` = the model itself, ``"model"`` = its ``.model`` attribute (causal LMs).
        hidden_act: transformers' default activation when config.json names none.
        renames: ``(regex, replacement)`` rules, applied in order, from the names the Hub's checkpoints use to
            the names hubload gives the family's tensors (the current transformers class's ``state_dict``
            names). Applied to every checkpoint loaded into the family's models, on either framework, and to
            the names keras-hub's converter reads. Empty when the two agree (BERT, GPT-2, ...); ViT needs
            them since transformers 5 renamed ViTModel's parameters while the Hub's files keep the old names.
        keras_config: ``(config.json key, backbone argument)`` pairs the keras-hub converter leaves out although
            they change the numbers (ViT's ``layer_norm_eps``); filled from config.json, or transformers'
            default for it.
        keras_absent: Globs on family tensor names that the keras-hub backbone has no variable for (ViT's
            pooler): reported as ignored on a Keras load, with the reason, never silently dropped.
    """

    name: str
    model_types: tuple[str, ...]
    torch: str
    config_class: str
    keras: str
    converter: str
    torch_output: str = "base"
    hidden_act: str | None = None
    renames: tuple[tuple[str, str], ...] = ()
    keras_config: tuple[tuple[str, str], ...] = ()
    keras_absent: tuple[str, ...] = ()


_CONVERT = "keras_hub.src.utils.transformers.convert_"

FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), "transformers:BertModel", "transformers:BertConfig",
           "keras_hub.models:BertBackbone", _CONVERT + "bert", hidden_act="gelu"),
    Family("distilbert", ("distilbert",), "transformers:DistilBertModel", "transformers:DistilBertConfig",
           "keras_hub.models:DistilBertBackbone", _CONVERT + "distilbert", hidden_act="gelu"),
    Family("gpt2", ("gpt2",), "transformers:GPT2Model", "transformers:GPT2Config",
           "keras_hub.models:GPT2Backbone", _CONVERT + "gpt2"),
    Family("llama", ("llama",), "transformers:LlamaForCausalLM", "transformers:LlamaConfig",
           "keras_hub.models:Llama3Backbone", _CONVERT + "llama3", "model"),
    Family("mistral", ("mistral",), "transformers:MistralForCausalLM", "transformers:MistralConfig",
           "keras_hub.models:MistralBackbone", _CONVERT + "mistral", "model"),
    Family("qwen2", ("qwen2",), "transformers:Qwen2ForCausalLM", "transformers:Qwen2Config",
           "keras_hub.models:QwenBackbone", _CONVERT + "qwen", "model"),
    # The Hub's ViT files use the names of transformers 4 (``encoder.layer.N.attention.attention.query``, and a
    # ``vit.`` prefix in ViTForImageClassification files); transformers 5's ViTModel has ``layers.N.attention.
    # q_proj``. The rules follow transformers' own ViTModel entry in transformers/conversion_mapping.py, and
    # are applied to checkpoint names on load, as transformers applies them.
    Family("vit", ("vit",), "transformers:ViTModel", "transformers:ViTConfig",
           "keras_hub.models:ViTBackbone", _CONVERT + "vit", hidden_act="gelu",
           renames=((r"^vit\.", ""), (r"^encoder\.layer\.", "layers."),
                    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
                    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
                    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
                    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
                    (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"\.output\.dense\.", ".mlp.fc2.")),
           keras_config=(("layer_norm_eps", "layer_norm_epsilon"),),  # keras-hub defaults to 1e-6, ViT to 1e-12
           keras_absent=("pooler.*",)),  # ViTBackbone's output is ViTModel's last_hidden_state: no pooler
)

# Not in the table: RoBERTa. keras-hub's converter is not one-to-one: it drops the first two rows of the
# position table (padding offset) and the token-type embedding row that transformers adds to every token, so
# a Keras -> torch conversion cannot rebuild the file, and torch -> Keras is right only when that row is zero.
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_for_config(config: dict[str, Any]) -> Family | None:
    """The family of a ``config.json`` (by ``model_type``), or None."""
    return _BY_TYPE.get(str(config.get("model_type", "")))


def family_for_class(cls: Any) -> tuple[Family, str] | None:
    """``(family, "torch" | "tf")`` when ``cls`` is one of the table's library classes, else None.

    Matched by class name and top-level module, so transformers/keras-hub are never imported here.
    """
    module = getattr(cls, "__module__", "") or ""
    name = getattr(cls, "__name__", "")
    root = module.split(".")[0]
    for fam in FAMILIES:
        if root == "transformers" and name == fam.torch.partition(":")[2]:
            return fam, "torch"
        if root == "keras_hub" and name == fam.keras.partition(":")[2]:
            return fam, "tf"
    return None


def architecture_for(config: dict[str, Any]) -> dict[str, str]:
    """The registry ``architecture`` mapping for a ``config.json`` (empty when its family is unknown)."""
    fam = family_for_config(config)
    return {} if fam is None else {"torch": fam.torch, "tf": fam.keras}


def _family_parts(model: Any) -> list[tuple[Any, Family, str]]:
    """``(module or layer, family, side)`` for ``model`` itself when it is a family class, else for the outermost
    family classes inside it (a transformers ``ViTModel`` under ``ViTForImageClassification`` or a user's module,
    a keras-hub backbone inside a task model or a functional model). Walks the model only when its framework is
    already imported; never imports one."""
    hit = family_for_class(type(model))
    if hit is not None:
        return [(model, *hit)]
    parts: list[tuple[Any, Family, str]] = []
    if callable(getattr(model, "named_modules", None)):  # torch: named_modules lists outer modules first
        inside: list[str] = []
        for path, sub in model.named_modules():
            sub_hit = family_for_class(type(sub))
            if sub_hit is not None and path and not any(path.startswith(p + ".") for p in inside):
                inside.append(path)
                parts.append((sub, *sub_hit))
    elif callable(getattr(model, "_flatten_layers", None)):  # Keras
        seen: set[int] = set()
        for layer in model._flatten_layers(include_self=False, recursive=True):
            sub_hit = family_for_class(type(layer))
            if sub_hit is not None and id(layer) not in seen:
                seen.update(id(x) for x in layer._flatten_layers(include_self=True, recursive=True))
                parts.append((layer, *sub_hit))
    return parts


def _one_family(parts: list[tuple[Any, Family, str]]) -> Family | None:
    """The family of every part (:func:`_family_parts`) when they are all one family, else None.

    Renames and absent-tensor globs are rules on checkpoint names; with two families in one model (a BERT text
    tower beside a ViT image tower) one family's rules could rename the other's tensors, so none apply and the
    report names what does not line up.
    """
    fams = {id(f): f for _, f, _ in parts}
    return next(iter(fams.values())) if len(fams) == 1 else None


def family_model_spec(model: Any, layout: str | None) -> dict[str, Any] | None:
    """The model spec of a Keras model holding keras-hub family backbones, with their variables under the Hub's
    (transformers) names, or None.

    None unless ``model`` is, or contains, a keras-hub backbone of the table and the checkpoint is in the torch
    layout, so every other model keeps its adapter's generic spec. A backbone inside a larger model (a keras-hub
    task such as ``BertTextClassifier``, a functional or subclassed model around it) takes the Hub names as they
    are when it is the only one, so the Hub's base-model file fills it and the model's own layers (the head) keep
    their generic names; two or more backbones are told apart by their structural prefixes (``encoder_a.``).
    Imports the Keras side only when it applies.

    Raises:
        HubloadError: Two names collide (a head variable's generic name equals a Hub name).
    """
    if layout == "keras":
        return None
    parts = [(layer, fam) for layer, fam, side in _family_parts(model) if side == "tf"]
    if not parts:
        return None
    from .adapters.hf_families import keras_spec

    if parts[0][0] is model:
        return keras_spec(model, parts[0][1])
    from .adapters import get_adapter

    spec_of = get_adapter("tf").spec
    generic = spec_of(model)
    name_of = {_handle_id(t): name for name, t in generic.items() if t.handle is not None}
    inner: set[int] = set()
    out_hub: dict[str, Any] = {}
    for layer, fam in parts:
        prefix = ""
        if len(parts) > 1:
            own = next(iter(spec_of(layer).items()), None)
            full = name_of.get(_handle_id(own[1])) if own is not None else None
            if full is None or not full.endswith(own[0]):
                from .errors import HubloadError

                raise HubloadError(f"{type(model).__name__}: cannot tell where {type(layer).__name__} "
                                   f"{getattr(layer, 'name', '')!r} sits in the model; please report it")
            prefix = full[: len(full) - len(own[0])]
        inner.update(id(w) for w in layer.weights)
        for name, t in keras_spec(layer, fam).items():
            out_hub[prefix + name] = replace(t, name=prefix + name)
    out = {name: t for name, t in generic.items() if _handle_id(t) not in inner}
    clash = sorted(set(out) & set(out_hub))
    if clash:
        from .errors import HubloadError

        raise HubloadError(f"{type(model).__name__}: the model's own variables {clash[:3]} have the names of the "
                           f"Hub tensors of its backbone; rename those layers")
    return {**out_hub, **out}


def _handle_id(t: Any) -> int:
    """``id`` of the variable behind a spec entry (the first one, for a group)."""
    handle = t.handle
    ports = getattr(handle, "ports", None)
    return id(ports[0][0]) if ports else id(handle)


def family_renames(model: Any) -> tuple[tuple[str, str], ...]:
    """The rename rules that turn Hub checkpoint names into the names of ``model``'s family (may be empty);
    for a model holding family classes of one family, that family's rules (see :func:`_one_family`)."""
    fam = _one_family(_family_parts(model))
    return () if fam is None else fam.renames


def family_ignore(model: Any) -> tuple[str, ...]:
    """Globs on checkpoint names that ``model``'s keras-hub family backbone(s) have no variable for, by design."""
    parts = _family_parts(model)
    fam = _one_family(parts)
    return fam.keras_absent if fam is not None and parts[0][2] == "tf" else ()
