"""vqkernels: fused vector-quantization kernels for PyTorch."""
from .backends import available_backends
from .quantize import VQOutput, nearest_code, vq_quantize
from .quantizers import GroupedVectorQuantizer, ResidualVectorQuantizer, VectorQuantizer
from .residual import (GVQOutput, RVQOutput, codes_from_indices, grouped_codes_from_indices,
                       grouped_vq, residual_vq)

__all__ = ["vq_quantize", "nearest_code", "VQOutput", "VectorQuantizer", "available_backends",
           "residual_vq", "grouped_vq", "codes_from_indices", "grouped_codes_from_indices",
           "RVQOutput", "GVQOutput", "ResidualVectorQuantizer", "GroupedVectorQuantizer"]
__version__ = "0.1.0"

# The VQ-VAE, so that `vqkernels.VQVAE.from_checkpoint(path)` is one import away (after the
# quantizer names it is built on).
from .model import VQVAE, VQVAEConfig  # noqa: E402

__all__ += ["VQVAE", "VQVAEConfig"]
