"""Import one module of an installed library without running its package's ``__init__``.

encodec's and descript-audio-codec's package ``__init__`` import torchaudio (for file
input and output), which does not load beside every torch build (PyPI's torchaudio is
built for one torch release and CUDA). Their quantizer modules need no torchaudio: this
loads such a module from the installed files, the library's own code as it is, under
its own name, so ``type(layer).__module__`` reads as in a normal install
(``encodec.quantization.core_vq``) and ``vqkern.patch`` recognizes its layers.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from types import ModuleType


def import_module(name: str, *, skip_init: Iterable[str]) -> ModuleType:
    """Import module ``name`` with the ``__init__`` of the packages in ``skip_init`` not run.

    Args:
        name: the module, e.g. ``"encodec.quantization.core_vq"``.
        skip_init: packages on its path, outermost first, whose ``__init__`` is left out
            (e.g. ``("encodec",)``, or ``("dac", "dac.nn")``). Each becomes an empty
            package module in ``sys.modules`` (its submodules import as usual); one
            imported before is left as it is.
    Returns:
        The module, run from the library's file as ``import`` runs it.
    """
    for package in skip_init:
        if package in sys.modules:
            continue
        spec = importlib.util.find_spec(package)
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError(f"no installed package named {package!r}", name=package)
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        parent, _, child = package.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return importlib.import_module(name)
