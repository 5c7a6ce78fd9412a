"""The old home of the codebook upkeep, kept so existing imports work: everything now lives in
`vqkernels.quantizers.upkeep` (beside the quantizer modules that use it)."""
from .quantizers.upkeep import *  # noqa: F401,F403
from .quantizers.upkeep import (DistContext, ceil_div, check_positive_int,  # noqa: F401
                                check_unit_interval, kmeans_plusplus, laplace_smoothed, lloyd,
                                pick_rows, seeded_generator, usage_stats)
