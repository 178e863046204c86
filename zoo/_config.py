"""Framework-free config validation shared by the twin zoos (``zoo_torch`` and ``zoo_keras``)."""

from __future__ import annotations

from collections.abc import Iterable

from hubload.errors import RegistryError

__all__ = ["check_bert_config"]


def check_bert_config(hidden_size: int, num_attention_heads: int, hidden_act: str, activations: Iterable[str]) -> None:
    """Raise RegistryError for a BERT config a zoo cannot build (``activations``: the names it supports)."""
    names = sorted(activations)
    if hidden_act not in names:
        raise RegistryError(f"hubload zoo 'bert' does not support hidden_act={hidden_act!r}; "
                            f"use one of {names} in the architecture config", field="config.hidden_act")
    if hidden_size % num_attention_heads:
        raise RegistryError(f"hubload zoo 'bert': hidden_size={hidden_size} is not divisible by "
                            f"num_attention_heads={num_attention_heads}; fix the architecture config",
                            field="config.hidden_size")
