"""vqkern: fused vector quantization for PyTorch.

Nearest-code search, straight-through gradients and codebook statistics
without ever materializing the N x K distance matrix.
"""
from . import _library, backends, reference
from .compat import (
    FSQ,
    LFQ,
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    ResidualFSQ,
    ResidualLFQ,
    ResidualVQ,
    VectorQuantize,
)
from .functional import QuantizeOutput, nearest_code, quantize, sample_code, segment_sum
from .integrations import patch, unpatch

# vqkern.kmeans is the function; its module stays importable as vqkern.kmeans (sys.modules).
from .kmeans import KMeansOutput, kmeans
from .modules import VectorQuantizer, VQOutput

__version__ = "0.2.0"

__all__ = [
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "KMeansOutput",
    "LFQ",
    "QuantizeOutput",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualVQ",
    "VectorQuantize",
    "VQOutput",
    "VectorQuantizer",
    "backends",
    "kmeans",
    "nearest_code",
    "patch",
    "quantize",
    "reference",
    "sample_code",
    "segment_sum",
    "unpatch",
]
