"""PyTorch / TensorFlow adapters, importable as ``hubload.adapters``."""
