"""hubload: pull verified model weights from model hubs and load them into PyTorch or Keras models.

    >>> import hubload
    >>> model = hubload.load("all-minilm-l6-v2", framework="tf")      # Keras model, PyTorch-published weights
    >>> paths = hubload.pull("all-minilm-l6-v2")                      # {"model.safetensors": Path(...)}
    >>> report = hubload.check("resnet18", framework="torch")         # CompatReport, no download needed

``import hubload`` imports no framework and no numpy; the API below loads its modules on first use.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import (
    AccessDeniedError,
    CacheError,
    CheckpointError,
    DownloadError,
    HashMismatchError,
    HubloadError,
    IncompatibleWeightsError,
    MissingDependencyError,
    ModelNotFoundError,
    NoWeightsError,
    OfflineError,
    RegistryError,
    UnsafeArchiveError,
    UnsafeCheckpointError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "Cache",
    "CacheError",
    "CheckpointError",
    "CompatReport",
    "DownloadError",
    "HashMismatchError",
    "HubloadError",
    "IncompatibleWeightsError",
    "MissingDependencyError",
    "ModelEntry",
    "ModelNotFoundError",
    "NoWeightsError",
    "OfflineError",
    "Registry",
    "RegistryError",
    "UnsafeArchiveError",
    "UnsafeCheckpointError",
    "UsageError",
    "__version__",
    "check",
    "convert",
    "inspect",
    "load",
    "load_registry",
    "pull",
    "verify",
]

logging.getLogger("hubload").addHandler(logging.NullHandler())

# Public name -> module that defines it; imported on first attribute access (PEP 562). No public function
# shares its module's name: importing such a submodule would rebind the package attribute to the module.
_LAZY = {
    "Cache": "cache",
    "CompatReport": "compat",
    "ModelEntry": "registry",
    "Registry": "registry",
    "check": "api",
    "convert": "relayout",
    "inspect": "api",
    "load": "api",
    "load_registry": "registry",
    "pull": "fetch",
    "verify": "fetch",
}

if TYPE_CHECKING:  # pragma: no cover
    from .api import check, inspect, load
    from .cache import Cache
    from .compat import CompatReport
    from .fetch import pull, verify
    from .registry import ModelEntry, Registry, load_registry
    from .relayout import convert


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hubload' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
