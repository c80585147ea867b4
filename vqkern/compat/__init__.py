"""Drop-in layers for other libraries' APIs, running on vqkern's fused kernels.

``from vqkern.compat import VectorQuantize, ResidualVQ`` replaces
``from vector_quantize_pytorch import VectorQuantize, ResidualVQ``.
"""
from .residual_vq import ResidualVQ
from .vector_quantize import VectorQuantize

__all__ = ["ResidualVQ", "VectorQuantize"]
