"""Drop-in layers for other libraries' APIs, running on vqkern's fused kernels.

``from vqkern.compat import VectorQuantize, ResidualVQ, GroupedResidualVQ`` replaces
``from vector_quantize_pytorch import VectorQuantize, ResidualVQ, GroupedResidualVQ``; the same
for ``LFQ, ResidualLFQ, GroupedResidualLFQ, FSQ, ResidualFSQ, GroupedResidualFSQ``.
"""
from .fsq import FSQ
from .lfq import LFQ
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .vector_quantize import VectorQuantize

__all__ = ["FSQ", "GroupedResidualFSQ", "GroupedResidualLFQ", "GroupedResidualVQ", "LFQ", "ResidualFSQ",
           "ResidualLFQ", "ResidualVQ", "VectorQuantize"]
