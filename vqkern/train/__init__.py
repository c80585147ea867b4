"""Reference VQ-VAE, gated PixelCNN prior, data loaders and the `python -m vqkern.train` command line."""
from .data import DataSplits, load_data, read_idx, read_image_folder, read_npy
from .model import VQVAE, make_quantizer
from .prior import GatedPixelCNN

__all__ = ["DataSplits", "GatedPixelCNN", "VQVAE", "load_data", "make_quantizer", "read_idx",
           "read_image_folder", "read_npy"]
