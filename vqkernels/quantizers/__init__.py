"""The quantizer modules and their codebook upkeep, side by side.

  vector.py    VectorQuantizer: one codebook (EMA, k-means++ init, dead-code restarts, usage stats)
  multi.py     ResidualVectorQuantizer, GroupedVectorQuantizer: one VectorQuantizer book per stage
               or group, driven by the multi-codebook ops, one packed all_reduce for all books
  upkeep.py    the upkeep itself: k-means++, Lloyd, Laplace smoothing, usage statistics, DDP sync

The functional ops (`vq_quantize`, `nearest_code`) live in `vqkernels.quantize`; modules here import
them, never the other way round.
"""
from .upkeep import DistContext, kmeans_plusplus, laplace_smoothed, lloyd, usage_stats
from .vector import VectorQuantizer
from .multi import GroupedVectorQuantizer, ResidualVectorQuantizer  # noqa: E402 (needs vector)

__all__ = ["VectorQuantizer", "ResidualVectorQuantizer", "GroupedVectorQuantizer", "kmeans_plusplus", "lloyd", "laplace_smoothed", "usage_stats",
           "DistContext"]
