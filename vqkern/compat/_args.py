"""Refuse, by name, the arguments of the wrapped libraries that the drop-ins do not implement."""
from __future__ import annotations


def _is_default(value, default) -> bool:
    if default is None:
        return value is None
    if isinstance(default, dict):
        return isinstance(value, dict) and value == default
    try:
        return bool(value == default)
    except Exception:  # tensors, callables: anything not plainly equal is not the default
        return False


def reject_unsupported(owner: str, given: dict, defaults: dict) -> None:
    """Raise NotImplementedError naming the first argument that is not at its default."""
    for name, default in defaults.items():
        if name in given and not _is_default(given[name], default):
            raise NotImplementedError(
                f"{owner}: argument {name}={given[name]!r} is not supported by vqkern's drop-in "
                f"(only its default {default!r} is); use vector_quantize_pytorch for this option")
