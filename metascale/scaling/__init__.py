"""Loss scaling as the step size: per-layer backward scaling and scaled optimizers that consume
gradients of ``s * L`` (``s`` as a step-size multiplier, or compensated for GradScaler).
The derivations and the tests that check them: docs/loss-scaling.md."""
from .backward import BackwardScaleHandle, grad_scale, scale_backward, scale_backward_groups, scaled_parameters
from .optimizers import ScaledAdagrad, ScaledAdam, ScaledAdamW, ScaledRMSprop, ScaledSGD

__all__ = ["BackwardScaleHandle", "grad_scale", "scale_backward", "scale_backward_groups", "scaled_parameters",
           "ScaledAdagrad", "ScaledAdam", "ScaledAdamW", "ScaledRMSprop", "ScaledSGD"]
