"""Drop-in layers for other libraries' APIs, running on vqkern's fused kernels.

``from vqkern.compat import VectorQuantize, ResidualVQ, GroupedResidualVQ`` replaces
``from vector_quantize_pytorch import VectorQuantize, ResidualVQ, GroupedResidualVQ``.
"""
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .vector_quantize import VectorQuantize

__all__ = ["GroupedResidualVQ", "ResidualVQ", "VectorQuantize"]
