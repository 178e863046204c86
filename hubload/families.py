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

from dataclasses import dataclass
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


def family_model_spec(model: Any, layout: str | None) -> dict[str, Any] | None:
    """The model spec of a keras-hub family backbone in the Hub's (transformers) names, or None.

    None unless ``model`` is a keras-hub backbone of the table and the checkpoint is in the torch layout,
    so every other model keeps its adapter's generic spec. Imports the Keras side only when it applies.
    """
    if layout == "keras":
        return None
    hit = family_for_class(type(model))
    if hit is None or hit[1] != "tf":
        return None
    from .adapters.hf_families import keras_spec

    return keras_spec(model, hit[0])


def family_renames(model: Any) -> tuple[tuple[str, str], ...]:
    """The rename rules that turn Hub checkpoint names into the names of ``model``'s family (may be empty)."""
    hit = family_for_class(type(model))
    return () if hit is None else hit[0].renames


def family_ignore(model: Any) -> tuple[str, ...]:
    """Globs on checkpoint names that ``model`` (a keras-hub family backbone) has no variable for, by design."""
    hit = family_for_class(type(model))
    return hit[0].keras_absent if hit is not None and hit[1] == "tf" else ()
