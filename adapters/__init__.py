"""Framework adapters, importable as ``hubload.adapters``: one thin module per framework.

An adapter is a module (or any object) with the same small protocol, :class:`Adapter`::

    name: str                                     # "torch", "tf"
    owns(model) -> bool                           # is this a model of my framework?
    spec(model) -> dict[str, ModelTensor]         # canonical name -> shape/dtype/native handle
    apply(model, report, reader, **options)       # copy the report's matched tensors; all-or-nothing
    build(architecture, config) -> model          # "package.module:callable" + keyword config
    ...                                           # and the rest api.py uses: place, build_scope, freeze,
                                                  # restore_native, load_full, describe, run, checkpoint_values,
                                                  # snapshot/restore, read_tensor, infer/convert inputs

The loading pipeline speaks the canonical layout (PyTorch ``state_dict`` names and shapes) on both
sides::

    reader = hubload.readers.open_checkpoint(path)                        # lazy metadata
    ckpt = hubload.layout.to_canonical(reader.tensors(), reader.layout)   # checkpoint side
    report = hubload.compat.check(ckpt, adapter.spec(model))              # model side
    report.raise_if_incompatible()                                        # before any copy
    adapter.apply(model, report, reader)

:mod:`hubload.adapters.torch` and :mod:`hubload.adapters.tf` import their framework at the top, so
importing one is the opt-in. This package imports neither: :func:`get_adapter` finds the adapter for
a name or a model object (looking only at frameworks already in ``sys.modules``), and falls back to
the ``hubload.adapters`` entry-point group so a third party (JAX, MLX) can add one without touching
hubload. Such an entry point is named after its framework's top-level module (``jax``) and points at
an object following :class:`Adapter`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from hubload.errors import IncompatibleWeightsError, MissingDependencyError, RegistryError, UsageError

__all__ = [
    "ADAPTER_ALIASES",
    "Adapter",
    "ModelTensor",
    "call_architecture",
    "get_adapter",
    "nothing_loaded_error",
    "resolve_architecture",
]

ENTRY_POINT_GROUP = "hubload.adapters"

# name -> (adapter module, pip extra). Aliases map onto the built-in adapters.
_BUILTIN: dict[str, tuple[str, str]] = {
    "torch": ("hubload.adapters.torch", "torch"),
    "tf": ("hubload.adapters.tf", "tf"),
}
ADAPTER_ALIASES: dict[str, str] = {
    "torch": "torch", "pt": "torch", "pytorch": "torch",
    "tf": "tf", "tensorflow": "tf", "keras": "tf", "tf_keras": "tf",
}
# Top-level module of a model class -> built-in adapter name.
_FRAMEWORK_ROOTS: dict[str, str] = {"torch": "torch", "keras": "tf", "tensorflow": "tf", "tf_keras": "tf"}


@dataclass(frozen=True)
class ModelTensor:
    """One model tensor as the model side of the compat check sees it.

    Attributes:
        name: Canonical name ("dense1.weight").
        shape: Canonical shape.
        dtype: Canonical dtype name ("float32").
        native: The framework's own name for it ("dense1/kernel" for Keras, the state_dict key for torch).
        transform: Canonical -> native re-layout (None = same layout).
        rule: The layout rule that fired, if any.
        handle: The live parameter/variable (not compared, not shown).
        structural: The framework's storage path of the tensor, if it has one (a Keras ``.weights.h5``
            dataset path, ``layers/dense_1/vars/0``): a checkpoint tensor stored there fills it even when
            the canonical names differ.
        group: For a member of an N-to-M conversion (an LSTM's ``bias_ih_l0`` and ``bias_hh_l0`` are one
            Keras ``bias``): the object that converts the whole group (``handle``/``transform`` are None).
        alternative: Another canonical form this tensor may take with its siblings (a MultiHeadAttention's
            separate q/k/v weights as ``in_proj_weight``); the checker picks the form the checkpoint has.
        ignored: Set for saved state that is not a weight (a seed generator): why it is left alone.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    native: str
    transform: Any = None
    rule: str | None = None
    handle: Any = field(default=None, compare=False, repr=False)
    structural: str | None = None
    group: Any = field(default=None, compare=False, repr=False)
    alternative: Any = field(default=None, compare=False, repr=False)
    ignored: str | None = None

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, native: str, transform: Any = None,
                 rule: str | None = None, handle: Any = None, structural: str | None = None, group: Any = None,
                 alternative: Any = None, ignored: str | None = None) -> None:
        # Frozen, filled in one call (see hubload.checkpoint.TensorInfo.__init__).
        self.__dict__.update(name=name, shape=shape, dtype=dtype, native=native, transform=transform, rule=rule,
                             handle=handle, structural=structural, group=group, alternative=alternative,
                             ignored=ignored)


@runtime_checkable
class Adapter(Protocol):
    """What hubload needs from a framework adapter (module or object).

    api.py uses exactly these capabilities and never asks which framework an adapter is, so a third-party
    adapter (JAX, MLX) that implements them all gets every feature: loading, freezing, native restore,
    behaviour comparison and numeric verification with rollback.
    """

    name: str
    native_layout: str  # "torch" or "keras": the tensor convention of the framework's own checkpoints
    native_formats: tuple[str, ...]  # checkpoint formats restore_native() reads (optimizer state included)
    apply_options: frozenset[str]  # keyword options apply() accepts ("dtype_policy", "device", "model_spec")
    dtype_policies: tuple[str, ...] | None  # the dtype= values apply() supports; None = any dtype name

    def owns(self, model: Any) -> bool:
        """True if ``model`` belongs to this adapter's framework."""

    def spec(self, model: Any) -> dict[str, ModelTensor]:
        """The model's tensors in the canonical layout, without copying data."""

    def apply(self, model: Any, report: Any, reader: Any, **options: Any) -> None:
        """Copy the report's matched tensors from ``reader`` into ``model``, all or nothing."""

    def build(self, architecture: str, config: dict[str, Any]) -> Any:
        """Instantiate ``"module:callable"`` with ``config`` as keywords."""

    def collective_load(self, model: Any) -> bool:
        """True if loading ``model`` is collective across processes (sharded over torch.distributed ranks), so
        the read-check-apply step must succeed on every rank or fail on every rank."""

    def build_scope(self, strategy: Any) -> Any:
        """Context manager to build a model under a distribution ``strategy`` (UsageError if unsupported)."""

    def place(self, model: Any, device: Any) -> Any:
        """The model on ``device`` (None: unchanged); UsageError if the framework has no such notion."""

    def freeze(self, model: Any, names: list[str]) -> None:
        """Make the named canonical tensors not trainable."""

    def restore_native(self, model: Any, path: Any, optimizer: Any = None) -> Any:
        """Restore a framework-native checkpoint (with optimizer state); returns the CompatReport."""

    def load_full(self, path: Any) -> Any:
        """Load a whole-model artifact (SavedModel, ``.keras``)."""

    def describe(self, model: Any, spec: Any, inputs: Any = None) -> dict[str, Any]:
        """Canonical prefix -> :class:`hubload.behaviour.LayerDesc`, traced with a recorded call on ``inputs``."""

    def run(self, model: Any, inputs: Any, *, spec: Any = None, record: bool = False,
            values: Any = None) -> tuple[list[Any], list[Any]]:
        """Outputs (numpy) on probe inputs in the framework's convention, and the recorded call if asked;
        with ``values`` (from :meth:`checkpoint_values`) the model runs on them, unchanged."""

    def checkpoint_values(self, model: Any, report: Any, reader: Any, spec: Any) -> Any:
        """The report's tensors as the model would hold them after the copy, for ``run(values=...)``; or None
        when the adapter prefers to verify after the copy and roll back (its rollback is cheaper)."""

    def snapshot(self, model: Any, names: Any, spec: Any) -> Any:
        """The named tensors' values before a copy (for :meth:`restore`); an object with ``close()`` is
        closed once the load is kept."""

    def restore(self, model: Any, snapshot: Any) -> None:
        """Put a snapshot back (rollback after a failed verification)."""

    def read_tensor(self, tensor: ModelTensor) -> Any:
        """A live model tensor's value in the canonical layout (a model used as a checkpoint)."""

    def infer_inputs(self, model: Any) -> list[Any] | None:
        """Probe inputs in the framework's convention from the shapes the model was built/called with."""

    def to_native_inputs(self, model: Any, inputs: Any) -> list[Any]:
        """Canonical (channels-first) inputs in the framework's convention."""

    def to_canonical_inputs(self, model: Any, inputs: Any) -> list[Any]:
        """The framework's inputs in the canonical (channels-first) convention."""


def nothing_loaded_error(reader: Any, model: Any, problems: list[str], report: Any,
                         verb: str) -> IncompatibleWeightsError:
    """The all-or-nothing refusal of an adapter's ``apply``: every problem listed, nothing was ``verb``."""
    return IncompatibleWeightsError(
        f"{getattr(reader, 'path', 'checkpoint')}: {len(problems)} tensor(s) cannot be loaded into "
        f"{type(model).__name__}; nothing was {verb}:\n  " + "\n  ".join(problems), report=report)


def _import_builtin(name: str) -> Any:
    """Import a built-in adapter, turning a missing framework into MissingDependencyError."""
    module, extra = _BUILTIN[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (getattr(exc, "name", None) or "").split(".")[0]
        if missing and not missing.startswith("hubload"):
            raise MissingDependencyError(f"the {name!r} adapter", extra, detail=str(exc)) from exc
        raise


def _entry_points() -> dict[str, Any]:
    """Entry points of the ``hubload.adapters`` group by name (built-ins excluded)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in _BUILTIN}


def _load_entry_point(ep: Any) -> Any:
    """Load a third-party adapter, with a clear error if that fails."""
    try:
        return ep.load()
    except ImportError as exc:
        raise MissingDependencyError(f"the {ep.name!r} adapter ({ep.value})", ep.name, detail=str(exc)) from exc


def _roots_of(model: Any) -> list[str]:
    """Top-level module names of the model's classes, most derived first."""
    roots: list[str] = []
    for cls in type(model).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root and root not in roots and root != "builtins":
            roots.append(root)
    return roots


def get_adapter(name_or_model: str | Any) -> Any:
    """Find the adapter for a framework name or a model object.

    Names: "torch"/"pt"/"pytorch" and "tf"/"tensorflow"/"keras"; any other name is looked up in the
    ``hubload.adapters`` entry-point group. For a model object, the modules of its class hierarchy
    decide; a framework is never imported just to look (only ``sys.modules`` is consulted).

    Args:
        name_or_model: A framework name, or a model instance.

    Returns:
        The adapter (for the built-ins, the module ``hubload.adapters.torch`` / ``.tf``).

    Raises:
        MissingDependencyError: The framework is not installed (the message gives the pip extra).
        UsageError: No adapter knows this name or model.
    """
    if isinstance(name_or_model, str):
        key = name_or_model.strip().lower()
        if key in ADAPTER_ALIASES:
            return _import_builtin(ADAPTER_ALIASES[key])
        eps = _entry_points()
        if key in eps:
            return _load_entry_point(eps[key])
        known = sorted(set(ADAPTER_ALIASES) | set(eps))
        raise UsageError(f"no hubload adapter named {name_or_model!r}; known: {', '.join(known)}. "
                         f"Third-party adapters register an entry point in the {ENTRY_POINT_GROUP!r} group.")

    model = name_or_model
    roots = _roots_of(model)
    for root in roots:
        builtin = _FRAMEWORK_ROOTS.get(root)
        if builtin and root in sys.modules:  # the model exists, so its framework is imported already
            adapter = _import_builtin(builtin)
            if adapter.owns(model):
                return adapter
    eps = _entry_points()
    for root in roots:
        if root in eps and root in sys.modules:
            adapter = _load_entry_point(eps[root])
            if adapter.owns(model):
                return adapter
    raise UsageError(f"no hubload adapter handles a {type(model).__module__}.{type(model).__qualname__}; "
                     "pass a torch.nn.Module or a keras Model/Layer, or install an adapter that registers "
                     f"an entry point named after its framework in the {ENTRY_POINT_GROUP!r} group.")


def resolve_architecture(architecture: str) -> Any:
    """Import ``"package.module:callable"`` and return the callable.

    Args:
        architecture: Module path and attribute path, separated by a colon (``"pkg.mod:Factory"``,
            ``"pkg.mod:Class.from_config"``).

    Returns:
        The callable.

    Raises:
        RegistryError: Malformed string, the module does not exist, or it has no such callable
            (field "architecture").
        MissingDependencyError: The module exists but needs a package that is not installed.
    """
    module_name, sep, attr_path = architecture.partition(":")
    if not sep or not module_name or not attr_path:
        raise RegistryError(f"architecture {architecture!r} must look like 'package.module:callable'",
                            field="architecture")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise RegistryError(f"architecture {architecture!r}: no module named {missing!r}; check the "
                                "spelling or install the package that provides it", field="architecture") from exc
        extra = {"torch": "torch", "tensorflow": "tf", "keras": "tf", "h5py": "tf"}.get(missing.split(".")[0])
        if extra:
            raise MissingDependencyError(f"architecture {architecture!r}", extra,
                                         detail=f"module {module_name!r} imports {missing!r}") from exc
        raise RegistryError(f"architecture {architecture!r}: module {module_name!r} needs {missing!r}, which is "
                            f"not installed (pip install {missing.split('.')[0]})", field="architecture") from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"architecture {architecture!r}: module {module_name!r} has no attribute "
                                f"{attr_path!r}", field="architecture") from None
    if not callable(obj):
        raise RegistryError(f"architecture {architecture!r}: {attr_path!r} is a {type(obj).__name__}, "
                            "not a callable", field="architecture")
    return obj


def call_architecture(architecture: str, config: dict[str, Any] | None) -> Any:
    """Resolve ``architecture`` and call it with ``config`` as keywords, naming it on failure."""
    factory = resolve_architecture(architecture)
    config = dict(config or {})
    from hubload.families import family_for_class

    if isinstance(factory, type) and family_for_class(factory) is not None:  # built from a config.json dict
        from .hf_families import build

        return build(factory, config)
    try:
        return factory(**config)
    except TypeError as exc:
        # A bad keyword in the config is the usual cause; say which architecture and config it was.
        raise RegistryError(f"architecture {architecture!r} rejected config {sorted(config)}: {exc}",
                            field="config") from exc
