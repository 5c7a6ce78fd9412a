"""The quantizer modules and their codebook upkeep, side by side.

  vector.py    VectorQuantizer: one codebook (EMA, k-means++ init, dead-code restarts, usage stats)
  upkeep.py    the upkeep itself: k-means++, Lloyd, Laplace smoothing, usage statistics, DDP sync

The functional ops (`vq_quantize`, `nearest_code`) live in `vqkernels.quantize`; modules here import
them, never the other way round.
"""
from .upkeep import DistContext, kmeans_plusplus, laplace_smoothed, lloyd, usage_stats
from .vector import VectorQuantizer

__all__ = ["VectorQuantizer", "kmeans_plusplus", "lloyd", "laplace_smoothed", "usage_stats",
           "DistContext"]
