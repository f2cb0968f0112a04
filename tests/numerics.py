"""Float tolerances derived from the arithmetic, not from one machine's results."""

from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23

# Each layer's matmuls and reductions may round differently when the batch shape or the thread
# count changes the summation order: a few ulps of the residual stream per layer, carried to
# the logits. Measured on SmolLM2 (30 layers): about 8 eps x the logit scale in all; this bound
# is 4 eps per layer (120 eps at 30 layers), so any real difference (a key attended twice or
# missed, a wrong position: 1e-3 of the scale and more) still fails by a wide margin.
ULPS_PER_LAYER = 4


def reorder_tolerance(logits: torch.Tensor, num_layers: int) -> float:
    """Largest |difference| float32 reordering can make in ``logits`` [..., V] of a
    ``num_layers``-deep model: ULPS_PER_LAYER x num_layers x eps x max |logit|."""
    return ULPS_PER_LAYER * num_layers * FP32_EPS * float(logits.abs().max())
