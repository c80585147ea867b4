"""Reference VQ-VAE, stage-2 priors (gated PixelCNN, transformer; text-conditioned), data loaders and the
`python -m vqkern.train` command line."""
from .data import (
    FASHION_MNIST_CLASSES,
    DataSplits,
    load_data,
    read_class_folders,
    read_idx,
    read_image_folder,
    read_npy,
)
from .model import VQVAE, make_quantizer
from .prior import GatedPixelCNN, TransformerPrior
from .text import Vocabulary

__all__ = ["FASHION_MNIST_CLASSES", "DataSplits", "GatedPixelCNN", "TransformerPrior", "VQVAE", "Vocabulary",
           "load_data", "make_quantizer", "read_class_folders", "read_idx", "read_image_folder", "read_npy"]
