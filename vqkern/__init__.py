"""vqkern: fused vector quantization for PyTorch.

Nearest-code search, straight-through gradients and codebook statistics
without ever materializing the N x K distance matrix.
"""
from . import _library, backends, reference
from .functional import QuantizeOutput, nearest_code, quantize, segment_sum
from .modules import VectorQuantizer, VQOutput

__version__ = "0.1.0"

__all__ = [
    "QuantizeOutput",
    "VQOutput",
    "VectorQuantizer",
    "backends",
    "nearest_code",
    "quantize",
    "reference",
    "segment_sum",
]
