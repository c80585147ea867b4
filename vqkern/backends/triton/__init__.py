"""Triton backend: fused search, straight-through backward and segment sum.

Runs on CUDA tensors; on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how the test
suite exercises these kernels on a machine without a GPU. Nothing here touches
the GPU or builds an autotuning config at import.
"""
from __future__ import annotations

import os

import torch

from .backward import backward, launch_backward
from .lfq_entropy import launch_lfq_entropy as lfq_entropy
from .lfq_entropy import launch_lfq_entropy_backward as lfq_entropy_backward
from .search import launch_sample, launch_search, sample, search
from .segment_sum import launch_segment_sum, segment_sum

__all__ = ["availability", "search", "launch_search", "sample", "launch_sample", "backward", "launch_backward", "segment_sum",
           "launch_segment_sum", "lfq_entropy", "lfq_entropy_backward"]


def availability(device: torch.device) -> tuple[bool, str]:
    """(True, reason) when the Triton kernels can run on tensors of ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is present"
        return True, "Triton kernels compiled for the CUDA device"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
        return False, "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1"
    return False, f"Triton runs on CUDA tensors, not on {device.type}"
