"""Launch on the tensors' device, whatever the current device is."""
from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """A context that makes t's CUDA device current: Triton launches on the current
    device's stream with its context, so tensors on cuda:1 under current device 0
    would run with the wrong device's pointers. CPU tensors (the interpreter): no-op."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
