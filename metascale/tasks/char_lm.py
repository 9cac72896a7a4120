"""Character-level language modelling on the Python standard library's own source, with a
small causal transformer (:class:`metascale.tasks.nets.CausalTransformer`). Offline: the text
is read from the running interpreter's stdlib folder (``sysconfig.get_paths()["stdlib"]``).

**Corpus and split.** Meta-train draws read ``argparse.py``, ``textwrap.py``, ``shlex.py`` and
``heapq.py``; meta-test draws read ``difflib.py``, ``calendar.py`` and ``fractions.py`` (UTF-8,
concatenated in that order with a newline between files; about 156 kB and 137 kB on Python
3.11). Within a split the first 90% of the characters are the training region and the last
10% the validation region. A draw takes ``n_train`` windows of ``seq_len + 1`` characters at
uniform random offsets in the training region and ``n_val`` in the validation region (offsets
from its ``data_seed``); a window ``w`` gives input ``w[:-1]`` and targets ``w[1:]``. The text
differs slightly between Python patch releases, so every config records the SHA-256 prefix of
its split's text.

**Vocabulary** (fixed, 97 tokens): ``0`` newline, ``1 .. 95`` the printable ASCII characters
32 (space) to 126, ``96`` everything else (tabs, non-ASCII). Inputs are token ids ``(N,
seq_len)`` (long), targets ``(N, seq_len)`` (long). Task kind ``"sequence"``: the task loss is
the mean next-character cross-entropy over all positions (nats; ``Task.loss`` takes logits
``(N, vocab, seq_len)`` as they are); ``metascale evaluate`` reports no accuracy for it,
``metascale bench`` the per-character accuracy. Learned losses (``--learn loss``) support
regression and classification tasks only.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import sysconfig
from pathlib import Path

import torch

from ..config import check
from .base import generator, randint
from . import reparam
from .nets import CausalTransformer
from .realdata import _ints

FILES = {"train": ("argparse.py", "textwrap.py", "shlex.py", "heapq.py"),
         "test": ("difflib.py", "calendar.py", "fractions.py")}
VOCAB = 97
TRAIN_FRACTION = 0.9


def encode(text: str) -> torch.Tensor:
    """Token ids (long) of ``text`` in the fixed 97-token vocabulary (module doc)."""
    b = torch.tensor(list(text.encode("utf-32-le")), dtype=torch.uint8).view(-1, 4)
    code = b[:, 0].long() | (b[:, 1].long() << 8) | (b[:, 2].long() << 16) | (b[:, 3].long() << 24)
    ids = torch.full_like(code, VOCAB - 1)
    ids[code == 10] = 0
    printable = (code >= 32) & (code <= 126)
    ids[printable] = code[printable] - 31
    return ids


@functools.lru_cache(maxsize=None)
def load(split: str) -> tuple[torch.Tensor, str]:
    """The split's text as token ids and the SHA-256 hex prefix (16) of its UTF-8 bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((root / f).read_text(encoding="utf-8") for f in FILES[split])
    return encode(text), hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class CharLMConfig:
    """Character-LM family.

    Attributes:
        seq_len: characters per input window.
        d_model: embedding width (range; a multiple of ``heads``).
        layers: transformer blocks (range).
        heads: attention heads.
        n_train, n_val: windows in the training pool and the validation set.
        reparam: ``[lo, hi]`` of ``log10 c`` for the weight reparameterisation
            augmentation (:mod:`metascale.tasks.reparam`); ``[0, 0]``: none.
    """

    seq_len: int = dataclasses.field(default=32, metadata=check("int", 2, 1024))
    d_model: tuple = dataclasses.field(default=(32, 32), metadata=check("interval", 1, 1024))
    layers: tuple = dataclasses.field(default=(1, 2), metadata=check("interval", 1, 32))
    heads: int = dataclasses.field(default=2, metadata=check("int", 1, 64))
    n_train: int = dataclasses.field(default=2000, metadata=check("int", 1, 1_000_000))
    n_val: int = dataclasses.field(default=128, metadata=check("int", 1, 100_000))
    reparam: tuple = dataclasses.field(default=(0.0, 0.0), metadata=check("interval", -3.0, 3.0))

    def validate(self) -> None:
        """Integer ranges; widths divisible by the head count."""
        for key in ("d_model", "layers"):
            lo, hi = getattr(self, key)
            if lo != int(lo) or hi != int(hi):
                raise ValueError(f"{key} = {[lo, hi]} is not allowed; expected a pair of integers")
        if int(self.d_model[0]) % self.heads or int(self.d_model[1]) % self.heads:
            raise ValueError(f"d_model = {list(self.d_model)} is not allowed; expected multiples of heads = {self.heads}")


class CharLMFamily:
    """Next-character prediction on stdlib source with a small causal transformer."""

    name = "char_lm"
    description = "character LM on Python stdlib source (offline), small causal transformer"

    def __init__(self, cfg: CharLMConfig):
        self.cfg = cfg

    def sample(self, g: torch.Generator, split: str) -> dict:
        """Split, corpus hash, width (a multiple of ``heads``), depth and data seed."""
        c = self.cfg
        lo, hi = _ints(c.d_model)
        d = c.heads * randint(g, -(-lo // c.heads), hi // c.heads)
        return {"split": split, "corpus_sha256": load(split)[1], "d_model": d, "layers": randint(g, *_ints(c.layers)),
                "data_seed": randint(g, 0, 2**31 - 1), **reparam.sample_seed(c.reparam, g)}

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Cut the draw's windows; the model is ``CausalTransformer(97, seq_len, d_model, layers, heads)``."""
        c = self.cfg
        ids, _ = load(config["split"])
        cut = int(TRAIN_FRACTION * ids.numel())
        gd = generator(config["data_seed"])
        w = c.seq_len + 1

        def windows(lo: int, hi: int, n: int) -> torch.Tensor:
            if hi - lo < w:
                raise ValueError(f"seq_len = {c.seq_len} does not fit the {hi - lo}-character region")
            starts = torch.randint(lo, hi - w + 1, (n,), generator=gd)
            return ids[starts[:, None] + torch.arange(w)]

        tr, va = windows(0, cut, c.n_train), windows(cut, ids.numel(), c.n_val)
        build, hook = reparam.wrap(lambda: CausalTransformer(VOCAB, c.seq_len, config["d_model"], config["layers"],
                                                             c.heads), c.reparam, config.get("reparam_seed"))
        return dict(kind="sequence", x_train=tr[:, :-1].contiguous(), y_train=tr[:, 1:].contiguous(),
                    x_val=va[:, :-1].contiguous(), y_val=va[:, 1:].contiguous(), build_model=build, init_hook=hook)
