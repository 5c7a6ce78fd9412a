"""vqkernels: fused vector-quantization kernels for PyTorch."""
from .backends import available_backends
from .quantize import VectorQuantizer, VQOutput, nearest_code, vq_quantize
from .model import VQVAE, VQVAEConfig  # noqa: E402  (after quantize: the model builds on it)

__all__ = ["vq_quantize", "nearest_code", "VQOutput", "VectorQuantizer", "available_backends",
           "VQVAE", "VQVAEConfig"]
__version__ = "0.1.0"
