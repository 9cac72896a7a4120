"""Differentiable inner loops (unrolls) over K training steps: the ``higher`` engine and the
``torch.func`` engine (explicit state, so long horizons can be cut into windows)."""
from ..spec import ENGINES, InnerConfig
from .func_engine import FuncUnrollResult, InnerState, init_state, unroll_func
from .higher_engine import DifferentiableLearned, UnrollResult, meta_objective, unroll

__all__ = ["ENGINES", "DifferentiableLearned", "FuncUnrollResult", "InnerConfig", "InnerState", "UnrollResult",
           "init_state", "meta_objective", "unroll", "unroll_func"]
