"""A model as a function of its parameters, for the inner loops of both engines."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize


class ModelFunction:
    """``model`` as a function of a list of parameters (``model.parameters()`` order).

    For plain modules the tensors are put straight into every owner's parameter table (tied
    weights included) before the call, and the originals restored by :meth:`restore`: a
    fraction of the cost of ``torch.func.functional_call``, which walks the module tree on every
    call. Models with parametrizations take ``functional_call``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.slots = None
        if not any(parametrize.is_parametrized(m) for m in model.modules()):
            owners: dict[int, list] = {}
            for mod in model.modules():
                for name, q in mod._parameters.items():
                    if q is not None:
                        owners.setdefault(id(q), []).append((mod, name, q))
            self.slots = [owners[id(q)] for q in model.parameters()]

    def __call__(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.slots is None:
            return functional_call(self.model, dict(zip(self.names, params)), (x,))
        for slots, p in zip(self.slots, params):
            for mod, name, _ in slots:
                mod._parameters[name] = p
        return self.model(x)

    def restore(self) -> None:
        """Put the model's own parameters back."""
        for slots in self.slots or []:
            for mod, name, q in slots:
                mod._parameters[name] = q
