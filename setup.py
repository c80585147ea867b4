"""vqkern build. The CUDA C++ extension build is added by the CUDA backend work."""
from setuptools import find_packages, setup

setup(
    name="vqkern",
    version="0.1.0",
    description="Fused vector-quantization kernels (Triton, CUDA C++) for PyTorch",
    packages=find_packages(include=["vqkern", "vqkern.*"]),
    python_requires=">=3.10",
    install_requires=["numpy"],
)
