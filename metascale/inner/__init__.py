"""Differentiable inner loops (unrolls) over K training steps."""
from .higher_engine import InnerConfig, UnrollResult, meta_objective, unroll

__all__ = ["InnerConfig", "UnrollResult", "meta_objective", "unroll"]
