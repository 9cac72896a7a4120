"""Architectures of the real-data families: MLP, residual MLP with LayerNorm, 2-D and 1-D
CNNs, a GRU classifier and a small causal transformer.

Every model here is initialised by :func:`metascale.tasks.base.seeded_init_` (matrices
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, a vector after a matrix with that matrix's fan-in),
like every other family's. So that a norm layer still starts as the identity map, its gain is
stored as an offset: :class:`OffsetLayerNorm` computes ``(1 + g) * LN(x) + b`` with
parameters ``g, b`` (both drawn near 0 by that init; cf. Gemma's ``1 + w`` RMSNorm gain).

Inputs always arrive as the task's 2-D ``x`` (a row per example, as every family stores
them); models that need an image or a sequence reshape it themselves (``nn.Unflatten``).
Sequence models output logits ``(N, vocab, seq)``: ``torch.nn.functional.cross_entropy``
takes them with targets ``(N, seq)`` as they are.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import ACTIVATIONS, mlp

MODELS = ("mlp", "resmlp", "cnn", "gru")  # classifiers of flat, image or 1-D inputs


class OffsetLayerNorm(nn.Module):
    """LayerNorm over the last dimension with gain ``1 + g`` and bias ``b``:
    ``(1 + g) * (x - mean) / sqrt(var + eps) + b``. Parameters ``g`` (then ``b``), each of
    shape ``(dim,)``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], 1 + self.g, self.b, self.eps)


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block: ``x + W2 act(W1 LN(x))`` (width ``dim``, hidden ``dim``)."""

    def __init__(self, dim: int, activation: str = "relu"):
        super().__init__()
        self.norm = OffsetLayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def residual_mlp(d_in: int, width: int, blocks: int, d_out: int, activation: str = "relu") -> nn.Sequential:
    """``Linear(d_in, width) -> blocks x ResidualBlock -> OffsetLayerNorm -> Linear(width, d_out)``."""
    return nn.Sequential(nn.Linear(d_in, width), *[ResidualBlock(width, activation) for _ in range(blocks)],
                         OffsetLayerNorm(width), nn.Linear(width, d_out))


def cnn2d(side: int, channels: int, layers: int, n_classes: int, activation: str = "relu") -> nn.Sequential:
    """Images ``(N, side*side)`` -> ``layers`` 3x3 convolutions (the first ``channels`` maps,
    doubling each layer; stride 2 with padding 1, so the side halves, rounding up) -> flatten
    -> ``Linear`` to ``n_classes``."""
    mods: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    c_in, s = 1, side
    for i in range(layers):
        c_out = channels * 2 ** i
        mods += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), ACTIVATIONS[activation]()]
        c_in, s = c_out, (s + 1) // 2
    return nn.Sequential(*mods, nn.Flatten(), nn.Linear(c_in * s * s, n_classes))


def cnn1d(length: int, channels: int, layers: int, n_classes: int, activation: str = "relu") -> nn.Sequential:
    """Signals ``(N, length)`` -> ``layers`` 1-D convolutions of width 5 (``channels`` maps,
    stride 2, padding 2: the length halves, rounding up) -> flatten -> ``Linear``."""
    mods: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    c_in, n = 1, length
    for _ in range(layers):
        mods += [nn.Conv1d(c_in, channels, 5, stride=2, padding=2), ACTIVATIONS[activation]()]
        c_in, n = channels, (n + 1) // 2
    return nn.Sequential(*mods, nn.Flatten(), nn.Linear(c_in * n, n_classes))


class GRUClassifier(nn.Module):
    """Reads a signal ``(N, length)`` one value per time step with a GRU of ``hidden`` units
    (``layers`` stacked) and classifies from the last hidden state with a ``Linear``."""

    def __init__(self, hidden: int, layers: int, n_classes: int):
        super().__init__()
        self.gru = nn.GRU(1, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.head(out[:, -1])


def classifier(kind: str, in_shape: Sequence[int], n_classes: int, width: int, depth: int,
               activation: str = "relu") -> nn.Module:
    """A classifier of inputs flattened from ``in_shape`` (``(d,)`` features, ``(side, side)``
    images or ``(length,)`` signals).

    ``kind``: ``"mlp"`` (``depth`` hidden layers of ``width``), ``"resmlp"`` (``depth``
    residual blocks of ``width``), ``"cnn"`` (``depth`` convolutions, ``width`` channels in the
    first; 2-D for images, 1-D for signals), ``"gru"`` (``depth`` stacked GRU layers of
    ``width`` units; signals only).
    """
    d_in = 1
    for s in in_shape:
        d_in *= s
    if kind == "mlp":
        return mlp((d_in, *[width] * depth, n_classes), activation)
    if kind == "resmlp":
        return residual_mlp(d_in, width, depth, n_classes, activation)
    if kind == "cnn":
        if len(in_shape) == 2:
            return cnn2d(in_shape[0], width, depth, n_classes, activation)
        return cnn1d(in_shape[0], width, depth, n_classes, activation)
    if kind == "gru":
        return GRUClassifier(width, depth, n_classes)
    raise ValueError(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``Linear(d, 3d)`` for queries, keys and values,
    ``softmax(q k^T / sqrt(d_head) + causal mask) v`` per head, then ``Linear(d, d)``."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model = {d} must be a multiple of heads = {heads}")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # written out rather than scaled_dot_product_attention: its fused CPU kernel has no
        # second derivative, and meta-training differentiates through the backward pass
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        y = att.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + W2 gelu(W1 LN(x))`` (4x)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.attn = OffsetLayerNorm(d), CausalSelfAttention(d, heads)
        self.ln2, self.fc1, self.fc2 = OffsetLayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class CausalTransformer(nn.Module):
    """A character-level language model: token embedding ``(vocab, d)`` plus a learned
    position embedding ``(seq_len, d)``, ``layers`` pre-norm blocks, a final LayerNorm and an
    untied ``Linear(d, vocab)`` head. Input: token ids ``(N, T)`` (``T <= seq_len``, any
    dtype, rounded to integers); output: logits ``(N, vocab, T)``."""

    def __init__(self, vocab: int, seq_len: int, d: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq_len, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = OffsetLayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.round().long() if idx.is_floating_point() else idx
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(h))).transpose(1, 2)
