"""Differentiable inner loops (unrolls) over K training steps: the ``higher`` engine and the
``torch.func`` engine (explicit state, so long horizons can be cut into windows)."""
from .func_engine import FuncUnrollResult, InnerState, init_state, unroll_func
from .higher_engine import ENGINES, InnerConfig, UnrollResult, meta_objective, unroll

__all__ = ["ENGINES", "FuncUnrollResult", "InnerConfig", "InnerState", "UnrollResult", "init_state",
           "meta_objective", "unroll", "unroll_func"]
