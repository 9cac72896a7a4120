"""Group parameters by role and relative depth, never by name.

The mapping rule (written into every exported file and shown by ``metascale info``):

* **role**: ``"matrix"`` if ``p.dim() >= 2`` else ``"vector"`` (biases, norm gains).
* **layer**: walking ``model.parameters()`` in order, every matrix starts a new layer; a
  vector belongs to the layer of the last matrix before it (vectors before any matrix belong
  to layer 0).
* **relative depth**: ``d = layer / (L - 1)`` for a model of ``L`` layers (``d = 0`` if
  ``L = 1``), so the first layer has depth 0 and the last depth 1 whatever the model's size.
* **anchors**: meta-parameters live at ``B`` depth anchors ``a_b = b / (B - 1)``; a group at
  depth ``d`` takes the piecewise-linear interpolation (in log space) of its two neighbouring
  anchors. A model with ``L = B`` layers maps each layer exactly onto one anchor.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

ROLES = ("matrix", "vector")

MAPPING_RULE = {
    "roles": list(ROLES),
    "role": "matrix if p.dim() >= 2 else vector",
    "layer": "in parameter order, each matrix starts a new layer; a vector joins the last matrix's layer (layer 0 if none yet)",
    "depth": "layer / (num_layers - 1), 0 for a single layer",
    "anchors": "b / (depth_bins - 1) for b in range(depth_bins)",
    "interpolation": "piecewise-linear in log space between the two anchors around the depth",
    "schedule_extension": "step t >= horizon uses the last learned step (t = horizon - 1)",
}


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """Where a parameter group sits: its role, layer index and the model's layer count."""

    role: str
    layer: int
    num_layers: int

    @property
    def depth(self) -> float:
        """Relative depth in [0, 1]."""
        return self.layer / (self.num_layers - 1) if self.num_layers > 1 else 0.0


def group_parameters(params: Iterable[torch.Tensor]) -> list[tuple[GroupInfo, list[torch.Tensor]]]:
    """Split ``params`` (in model order) into groups by (role, layer); see the module doc.

    Returns a list of ``(GroupInfo, [tensors])`` ordered by layer, matrix before vector.
    """
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    if any(isinstance(p, dict) for p in params):
        raise ValueError("metascale optimizers group parameters themselves (by role and depth); "
                         "pass model.parameters(), not parameter-group dicts")
    layer, assigned = -1, []
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"expected tensors, got {type(p).__name__}")
        if p.dim() >= 2:
            layer += 1
        assigned.append(("matrix" if p.dim() >= 2 else "vector", max(layer, 0)))
    num_layers = max(layer, 0) + 1
    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    for p, (role, lay) in zip(params, assigned):
        out.setdefault((lay, ROLES.index(role)), []).append(p)
    return [(GroupInfo(ROLES[r], lay, num_layers), ps) for (lay, r), ps in sorted(out.items())]


def anchor_weights(depth: float, bins: int) -> list[float]:
    """Interpolation weights ``w`` over ``bins`` anchors for relative depth ``depth``.

    ``sum(w) = 1``; at most two neighbouring entries are non-zero; ``w`` is one-hot when
    ``depth`` is an anchor.
    """
    if bins == 1:
        return [1.0]
    x = min(max(depth, 0.0), 1.0) * (bins - 1)
    lo = min(int(x), bins - 2)
    frac = x - lo
    w = [0.0] * bins
    w[lo], w[lo + 1] = 1.0 - frac, frac
    return w
