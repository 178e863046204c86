"""hubload: pull verified model weights and load them into PyTorch or Keras models."""

from __future__ import annotations

__version__ = "0.1.0"
