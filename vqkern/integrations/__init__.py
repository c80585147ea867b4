"""``vqkern.patch``: other libraries' quantizer layers served by vqkern's kernels, in place.

A model built by another library (diffusers, transformers, encodec, moshi, DAC, taming,
vector-quantize-pytorch) keeps every object it has: each recognized layer keeps its class,
its parameters and buffers (the same tensors) and so its ``state_dict``; only the methods
the library calls are bound on the instance to functions that search with vqkern's fused
ops instead of building the N x K distance matrix. ``unpatch`` removes exactly those
bindings.

Layers are recognized by their class's qualified name (``module.qualname``), so vqkern
imports none of these libraries. Each library's adapters live in a file of this package
and register themselves with :func:`register`.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import inspect
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import backends

# One file per library (two modules of one library may take one each); each registers its
# adapters when imported. None of them imports the library it serves.
_ADAPTER_MODULES = ("diffusers", "taming", "transformers_image", "vector_quantize", "vector_quantize_lfq", "encodec",
                   "moshi", "dac", "transformers_audio")

_STATE = "_vqkern_patch"


@dataclass(frozen=True)
class Adapter:
    """How vqkern serves one class of another library.

    methods: method name -> replacement function ``fn(layer, *args, **kwargs)``, bound on
        the patched instance under that name.
    check: ``check(layer) -> str | None``: why this instance cannot be served exactly
        (an option and its reason), or None when it can. A layer it rejects stays as it is.
    setup: ``setup(layer, backend) -> object``: per-layer data the methods need (read back
        with :func:`patch_data`), made before anything is bound; an exception it raises
        leaves the whole model as it was.
    caveat: ``caveat(layer) -> str | None``: how a layer it serves differs observably from
        the original though it follows the same semantics (random draws of vqkern's own, say);
        ``patch`` patches the layer and warns with it.
    on_load: ``on_load(layer, incompatible_keys)``: run after a state dict is loaded into the
        patched layer (or a model holding it), to refresh host-side copies of its buffers;
        registered as a load-state-dict post-hook while the layer is patched.
    """
    methods: Mapping[str, Callable]
    check: Callable[[nn.Module], str | None] | None = None
    setup: Callable[[nn.Module, str], Any] | None = None
    caveat: Callable[[nn.Module], str | None] | None = None
    on_load: Callable[[nn.Module, Any], None] | None = None


@dataclass
class PatchState:
    """What ``patch`` bound on a layer: the backend its methods call, the method names, the
    adapter's per-layer data (its ``setup`` result) and the ids of the load hooks it added."""
    backend: str
    names: tuple[str, ...] = field(default_factory=tuple)
    data: Any = None
    hooks: tuple[int, ...] = ()

    def __deepcopy__(self, memo):
        # A deep copy of a patched model is patched: the copied bound methods are bound to the
        # copies of the layers, the data follows (with the copies of the layers' tensors).
        return PatchState(self.backend, self.names, copy.deepcopy(self.data, memo), self.hooks)

    def __reduce__(self):
        # A pickled model (torch.save(model)) loads unpatched: its bound methods are pickled by
        # name and load as the class's own (see _named), and this state as None.
        return _no_state, ()


def _no_state():
    return None


def _named(fn: Callable, name: str) -> Callable:
    """``fn`` under the name of the method it replaces: a bound method pickles as
    ``getattr(layer, fn.__name__)``, which then loads the class's own method."""
    if fn.__name__ == name:
        return fn
    named = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    named.__kwdefaults__, named.__doc__, named.__module__ = fn.__kwdefaults__, fn.__doc__, fn.__module__
    named.__qualname__ = fn.__qualname__
    return named


def _on_load(layer: nn.Module, incompatible_keys) -> None:
    """The load-state-dict post-hook of a patched layer: its adapter's ``on_load``; nothing
    once the layer is unpatched (or loaded unpatched from a pickle)."""
    if state(layer) is not None:
        _registry()[qualified_name(type(layer))].on_load(layer, incompatible_keys)


_REGISTRY: dict[str, Adapter] = {}
_loaded = False


def register(*qualnames: str, methods: Mapping[str, Callable],
             check: Callable[[nn.Module], str | None] | None = None,
             setup: Callable[[nn.Module, str], Any] | None = None,
             caveat: Callable[[nn.Module], str | None] | None = None,
             on_load: Callable[[nn.Module, Any], None] | None = None) -> Adapter:
    """Register an adapter for the classes named ``module.QualName`` (as ``type(x).__module__``
    and ``__qualname__`` spell them); see :class:`Adapter` for the hooks."""
    adapter = Adapter({name: _named(fn, name) for name, fn in methods.items()}, check, setup, caveat, on_load)
    for name in qualnames:
        if name in _REGISTRY:
            raise ValueError(f"an adapter for {name} is registered already")
        _REGISTRY[name] = adapter
    return adapter


def _registry() -> dict[str, Adapter]:
    global _loaded
    if not _loaded:
        for name in _ADAPTER_MODULES:
            importlib.import_module(f"{__name__}.{name}")
        _loaded = True
    return _REGISTRY


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def supported() -> tuple[str, ...]:
    """The qualified class names ``patch`` recognizes."""
    return tuple(sorted(_registry()))


def state(layer: nn.Module) -> PatchState | None:
    """The patch state of a layer, or None when it is not patched."""
    return layer.__dict__.get(_STATE)


def backend_of(layer: nn.Module) -> str:
    """The backend name a patched layer's methods pass to vqkern's ops."""
    return layer.__dict__[_STATE].backend


def patch_data(layer: nn.Module) -> Any:
    """The per-layer data its adapter's ``setup`` made when the layer was patched."""
    return layer.__dict__[_STATE].data


@functools.cache
def source_digest(obj) -> str | None:
    """SHA-256 of the source text of a class, function or module (None when Python cannot
    read it). Adapters compare it with the source they were written against, so that a
    library release that changes a layer's code leaves that layer unpatched rather than
    served with the old semantics."""
    try:
        text = inspect.getsource(obj)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def source_mismatch(obj, digests: frozenset[str], written_for: str) -> str | None:
    """None when ``obj``'s source is one the adapter reproduces, else the reason it is not."""
    digest = source_digest(obj)
    if digest in digests:
        return None
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    if digest is None:
        return f"the source of {name} cannot be read, so vqkern cannot tell whether it is the code it reproduces"
    return (f"the source of {name} is not the code vqkern's adapter reproduces ({written_for}); "
            f"its SHA-256 is {digest[:16]}...")


def _device_of(layer: nn.Module) -> torch.device | None:
    for t in layer.parameters(recurse=True):
        return t.device
    for t in layer.buffers(recurse=True):
        return t.device
    return None


def patch(model: nn.Module, *, backend: str = "auto") -> dict[str, str]:
    """Serve the recognized quantizer layers of ``model`` with vqkern's kernels, in place.

    Args:
        model: an already-built ``nn.Module`` (the layers may be anywhere inside it, or
            ``model`` itself).
        backend: "auto" or a backend name ("cuda", "triton", "torch", "reference"); an
            explicit backend that cannot run on a layer's device raises before anything
            is changed.
    Returns:
        {module path: class name} of the layers patched by this call ("" is ``model``
        itself). Layers patched before are left as they are and not listed; a layer in a
        configuration vqkern cannot serve exactly stays unpatched, with a warning that
        names the layer, the option and why; a layer served with the same semantics but
        observably other random draws is patched with a warning that says so.
    Raises:
        TypeError / ValueError for a ``model`` that is not a Module or an unknown backend;
        RuntimeError when an explicit backend cannot run on a layer's device. Nothing is
        patched then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str) or backend not in ("auto",) + backends.BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + backends.BACKENDS}, got {backend!r}")
    registry = _registry()
    plan = []
    for path, layer in model.named_modules():
        adapter = registry.get(qualified_name(type(layer)))
        if adapter is None or state(layer) is not None:
            continue
        where = f"{path or type(layer).__name__} ({qualified_name(type(layer))})"
        reason = adapter.check(layer) if adapter.check is not None else None
        if reason is not None:
            warnings.warn(f"vqkern.patch: left {where} unpatched: {reason}", stacklevel=2)
            continue
        device = _device_of(layer)
        if backend != "auto" and device is not None:
            ok, why = backends.availability(backend, device)
            if not ok:
                raise RuntimeError(f"vqkern.patch: backend={backend!r} cannot serve {where} on {device}: {why}")
        data = adapter.setup(layer, backend) if adapter.setup is not None else None
        plan.append((path, layer, adapter, data))
        note = adapter.caveat(layer) if adapter.caveat is not None else None
        if note is not None:
            warnings.warn(f"vqkern.patch: {where}: {note}", stacklevel=2)
    # Nothing is bound until every layer has been checked and set up, so an error above
    # leaves the model as it was.
    patched = {}
    for path, layer, adapter, data in plan:
        for name, fn in adapter.methods.items():
            layer.__dict__[name] = types.MethodType(fn, layer)
        hooks = () if adapter.on_load is None else (layer.register_load_state_dict_post_hook(_on_load).id,)
        layer.__dict__[_STATE] = PatchState(backend, tuple(adapter.methods), data, hooks)
        patched[path] = type(layer).__name__
    return patched


def unpatch(model: nn.Module) -> dict[str, str]:
    """Undo :func:`patch`: remove exactly the methods and hooks it added. Returns {path: class
    name} of the layers restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = {}
    for path, layer in model.named_modules():
        st = layer.__dict__.pop(_STATE, None)
        if st is None:
            continue
        for name in st.names:
            layer.__dict__.pop(name, None)
        for hook in st.hooks:
            layer._load_state_dict_post_hooks.pop(hook, None)
        restored[path] = type(layer).__name__
    return restored
