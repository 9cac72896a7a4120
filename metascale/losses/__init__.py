"""Learnable losses (ML3-style loss network, learned adaptive loss scale)."""
from .learned import KINDS, AdaptiveScaleLoss, LossConfig, ML3Loss, make_loss

__all__ = ["KINDS", "AdaptiveScaleLoss", "LossConfig", "ML3Loss", "make_loss"]
