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

import importlib
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from .. import backends

# One file per library; each registers its adapters when imported. None of them imports
# the library it serves.
_ADAPTER_MODULES = ("encodec", "moshi", "dac", "transformers_audio")

_STATE = "_vqkern_patch"


@dataclass(frozen=True)
class Adapter:
    """How vqkern serves one class of another library.

    methods: method name -> replacement function ``fn(layer, *args, **kwargs)``, bound on
        the patched instance under that name.
    check: ``check(layer) -> str | None``: why this instance cannot be served exactly
        (an option and its reason), or None when it can. A layer it rejects stays as it is.
    """
    methods: Mapping[str, Callable]
    check: Callable[[nn.Module], str | None] | None = None


@dataclass
class PatchState:
    """What ``patch`` bound on a layer: the backend its methods call and the method names."""
    backend: str
    names: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, Adapter] = {}
_loaded = False


def register(*qualnames: str, methods: Mapping[str, Callable],
             check: Callable[[nn.Module], str | None] | None = None) -> Adapter:
    """Register an adapter for the classes named ``module.QualName`` (as ``type(x).__module__``
    and ``__qualname__`` spell them)."""
    adapter = Adapter(dict(methods), check)
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
        names the layer, the option and why.
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
        reason = adapter.check(layer) if adapter.check is not None else None
        if reason is not None:
            warnings.warn(f"vqkern.patch: left {path or type(layer).__name__} "
                          f"({qualified_name(type(layer))}) unpatched: {reason}", stacklevel=2)
            continue
        device = _device_of(layer)
        if backend != "auto" and device is not None:
            ok, why = backends.availability(backend, device)
            if not ok:
                raise RuntimeError(f"vqkern.patch: backend={backend!r} cannot serve "
                                   f"{path or type(layer).__name__} on {device}: {why}")
        plan.append((path, layer, adapter))
    patched = {}
    for path, layer, adapter in plan:
        for name, fn in adapter.methods.items():
            layer.__dict__[name] = types.MethodType(fn, layer)
        layer.__dict__[_STATE] = PatchState(backend, tuple(adapter.methods))
        patched[path] = type(layer).__name__
    return patched


def unpatch(model: nn.Module) -> dict[str, str]:
    """Undo :func:`patch`: remove exactly the methods it bound. Returns {path: class name}
    of the layers restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = {}
    for path, layer in model.named_modules():
        st = layer.__dict__.pop(_STATE, None)
        if st is None:
            continue
        for name in st.names:
            layer.__dict__.pop(name, None)
        restored[path] = type(layer).__name__
    return restored
