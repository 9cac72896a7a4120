"""The fixed task suites of ``metascale bench``.

A suite is a list of :class:`BenchTask`: a family from :data:`metascale.tasks.FAMILIES`, its
spec table with every range pinned (one architecture per task), a batch size and a horizon
``T``. Evaluation seed ``s`` is draw 0 of the family's *meta-test* sampler with seed ``s``
(data rows, model init and minibatch order all follow from it); tuning uses draw 0 of the
*meta-train* sampler with seed :data:`TUNE_SEED`, i.e. other rows of the data set, another
init and another batch order.

``heldout``: 14 tasks on data, architectures and horizons that no shipped meta-training spec
uses (docs/benchmarks.md lists what is new in each). ``small``: 4 short tasks for development.
"""
from __future__ import annotations

import dataclasses
import json

TUNE_SEED = 1000


@dataclasses.dataclass(frozen=True)
class BenchTask:
    """One suite entry.

    Attributes:
        name: unique within its suite.
        family: family name (``metascale.tasks.FAMILIES``).
        table: the family's spec table, as ``(key, value)`` pairs.
        batch_size: minibatch size.
        steps: horizon ``T`` (optimizer steps).
        what: one line on what the task tests.
    """

    name: str
    family: str
    table: tuple
    batch_size: int
    steps: int
    what: str = ""

    def fingerprint(self) -> str:
        """A canonical JSON of everything that defines the task (tuning caches key on it)."""
        return json.dumps({"family": self.family, "table": dict(self.table), "batch_size": self.batch_size,
                           "steps": self.steps}, sort_keys=True)


def _t(name, family, batch_size, steps, what, **table) -> BenchTask:
    pinned = {k: ([v, v] if k in ("width", "depth", "d_model", "layers") else v) for k, v in table.items()}
    return BenchTask(name, family, tuple(sorted(pinned.items())), batch_size, steps, what)


SMALL = [
    _t("mnist8_mlp", "mnist", 64, 200, "8x8 MNIST, MLP 64-32-32-10",
       resolution=8, models=["mlp"], width=32, depth=2, n_train=1000, n_val=300),
    _t("mnist1d_cnn", "mnist_1d", 64, 200, "MNIST-1D, 1-D CNN",
       models=["cnn"], width=16, depth=2, n_train=1000, n_val=300),
    _t("wine_resmlp", "tabular", 32, 200, "wine, residual MLP with LayerNorm",
       datasets=["wine"], models=["resmlp"], width=32, depth=2),
    _t("char_lm", "char_lm", 16, 100, "character LM, 1-block transformer",
       seq_len=16, d_model=16, layers=1, heads=2, n_train=500, n_val=32),
]

HELDOUT = [
    _t("mnist8_mlp_T1k", "mnist", 128, 1000, "8x8 MNIST, MLP 64-32-32-10 (a meta-training-sized model), T=1k",
       resolution=8, models=["mlp"], width=32, depth=2, n_train=2000, n_val=400),
    _t("mnist8_mlp_T10k", "mnist", 128, 10_000, "the same task at T=10k (horizon alone)",
       resolution=8, models=["mlp"], width=32, depth=2, n_train=2000, n_val=400),
    _t("mnist8_deep15", "mnist", 128, 1000, "8x8 MNIST, MLP with 14 hidden layers of 32 (15 linear layers)",
       resolution=8, models=["mlp"], width=32, depth=14, n_train=2000, n_val=400),
    _t("mnist_wide_bs16", "mnist", 16, 1000, "28x28 MNIST, wide MLP 784-1024-10, batch 16",
       resolution=28, models=["mlp"], width=1024, depth=1, n_train=2000, n_val=400),
    _t("mnist_cnn", "mnist", 64, 1000, "28x28 MNIST, CNN (8, 16 channels)",
       resolution=28, models=["cnn"], width=8, depth=2, n_train=2000, n_val=400),
    _t("mnist8_cnn_T5k", "mnist", 32, 5000, "8x8 MNIST, CNN (16, 32 channels), batch 32, T=5k",
       resolution=8, models=["cnn"], width=16, depth=2, n_train=2000, n_val=400),
    _t("mnist1d_resmlp", "mnist_1d", 128, 1000, "MNIST-1D, residual MLP (4 LayerNorm blocks of 64)",
       models=["resmlp"], width=64, depth=4, n_train=2000, n_val=400),
    _t("mnist1d_cnn_bs512", "mnist_1d", 512, 1000, "MNIST-1D, 1-D CNN (3 layers of 16 channels), batch 512",
       models=["cnn"], width=16, depth=3, n_train=2000, n_val=400),
    _t("mnist1d_gru", "mnist_1d", 64, 1000, "MNIST-1D, GRU (32 units)",
       models=["gru"], width=32, depth=1, n_train=2000, n_val=400),
    _t("mnist1d_mlp_T5k", "mnist_1d", 128, 5000, "MNIST-1D, MLP 40-64-64-10, T=5k",
       models=["mlp"], width=64, depth=2, n_train=2000, n_val=400),
    _t("char_lm", "char_lm", 32, 1000, "character LM, 2-block causal transformer (d=32, context 32)",
       seq_len=32, d_model=32, layers=2, heads=2, n_train=4000, n_val=64),
    _t("breast_cancer_bs16", "tabular", 16, 1000, "breast cancer table, MLP 30-64-64-2, batch 16",
       datasets=["breast_cancer"], models=["mlp"], width=64, depth=2),
    _t("wine_resmlp_T5k", "tabular", 32, 5000, "wine table, residual MLP with LayerNorm (2 blocks of 32), T=5k",
       datasets=["wine"], models=["resmlp"], width=32, depth=2),
    _t("iris_mlp_T10k", "tabular", 16, 10_000, "iris table, MLP 4-32-3, batch 16, T=10k",
       datasets=["iris"], models=["mlp"], width=32, depth=1),
]

SUITES: dict[str, list[BenchTask]] = {"small": SMALL, "heldout": HELDOUT}
