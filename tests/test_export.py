"""Exported optimizer files: round trip, resume, transfer to other shapes, and bad files."""
from __future__ import annotations

import copy
import io
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from metascale.config import to_dict
from metascale.errors import ExportFormatError
from metascale.export import load_optimizer, read_optimizer, save_optimizer
from metascale.optim.groups import MAPPING_RULE
from metascale.optim import RULES, LayerwiseConfig, LearnedOptimizer

init_meta = RULES["layerwise"].init_meta
from metascale.spec import load_spec, spec_from_dict

SINE = Path(__file__).parent.parent / "tasks" / "sine.toml"
HORIZON = 6
CONFIG = LayerwiseConfig(init_lr=0.01, momentum=0.9, nesterov=False, per_step=True, depth_bins=3)
SUMMARY = {"meta_steps": 7, "seed": 3, "first_meta_loss": 0.5, "final_meta_loss_avg_last_10pct": 0.125,
           "skipped_tasks": 0, "note": "unicode ok: \u00e9\u03b7"}
META_KEYS = {"format", "format_version", "rule", "rule_config", "horizon", "group_mapping", "spec", "summary"}




def make_meta(config: LayerwiseConfig = CONFIG, horizon: int = HORIZON, seed: int = 0,
              spread: float = 0.4) -> dict[str, torch.Tensor]:
    """Unit meta-parameters plus seeded uniform noise in [-spread, spread] (log space)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + spread * (2 * torch.rand(v.shape, generator=g) - 1)
            for k, v in init_meta(config, horizon).items()}


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def spec_dict() -> dict:
    return load_spec(SINE).to_dict()


@pytest.fixture
def good(tmp_path, spec_dict):
    """A well-formed file and the meta-parameters it holds."""
    meta = make_meta()
    return save_optimizer(tmp_path / "sub" / "dir" / "opt.safetensors", meta, CONFIG, spec_dict, SUMMARY), meta


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("config,horizon,shape", [
    (CONFIG, HORIZON, (2, 3, HORIZON)),
    (LayerwiseConfig(init_lr=0.3, momentum=0.0, per_step=False, depth_bins=1), 5, (2, 1, 1)),
    (LayerwiseConfig(init_lr=1e-3, momentum=0.5, nesterov=True, per_step=True, depth_bins=5), 2, (2, 5, 2)),
])
def test_round_trip_is_bitwise(tmp_path, spec_dict, config, horizon, shape):
    meta = make_meta(config, horizon, seed=7)
    assert meta["log_step_size"].shape == shape
    path = save_optimizer(tmp_path / "a" / "b.safetensors", meta, config, spec_dict, SUMMARY)
    assert path == tmp_path / "a" / "b.safetensors" and path.is_file()  # parent folders created

    exp = read_optimizer(path)
    assert set(exp.meta) == {"log_step_size", "log_scale"}
    for k, v in meta.items():
        assert exp.meta[k].dtype == torch.float32
        assert torch.equal(exp.meta[k], v), k
    # the perturbation made every entry distinct, so a transposed/shuffled tensor would fail above
    assert exp.meta["log_step_size"].unique().numel() == exp.meta["log_step_size"].numel()
    assert exp.config == config
    assert exp.rule == "layerwise"
    assert exp.spec == spec_dict
    assert exp.summary == SUMMARY
    assert exp.group_mapping == MAPPING_RULE
    # the horizon: the schedules' length when they are per step, else the spec's inner horizon
    assert exp.horizon == (shape[2] if config.per_step else load_spec(SINE).inner.horizon)
    # the stored spec turns back into the spec it came from
    assert spec_from_dict(exp.spec, "sine", str(SINE), str(SINE)) == load_spec(SINE)

    # the documented on-disk layout: exactly these metadata keys, JSON values
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
        assert sorted(f.keys()) == ["log_scale", "log_step_size"]
    assert set(raw) == META_KEYS
    assert (raw["format"], raw["format_version"], raw["rule"]) == ("metascale.optimizer", "2", "layerwise")
    assert json.loads(raw["rule_config"]) == to_dict(config)
    assert json.loads(raw["group_mapping"]) == MAPPING_RULE


def test_save_converts_to_float32_and_detaches(tmp_path, spec_dict):
    meta64 = {k: v.double().requires_grad_(True) for k, v in make_meta(seed=2).items()}
    path = save_optimizer(tmp_path / "o.safetensors", meta64, CONFIG, spec_dict, SUMMARY)
    exp = read_optimizer(path)
    for k, v in meta64.items():
        assert exp.meta[k].dtype == torch.float32 and not exp.meta[k].requires_grad
        assert torch.equal(exp.meta[k], v.detach().float())


# --------------------------------------------------------------------------- resume
def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("momentum,nesterov", [(0.9, False), (0.8, True), (0.0, False)])
def test_resume_from_state_dict(tmp_path, spec_dict, momentum, nesterov):
    config = LayerwiseConfig(init_lr=0.02, momentum=momentum, nesterov=nesterov, per_step=True, depth_bins=3)
    # a strongly varying per-step schedule, so resuming at the wrong step changes the result
    path = save_optimizer(tmp_path / "o.safetensors", make_meta(config, HORIZON, seed=1, spread=1.0),
                          config, spec_dict, SUMMARY)
    torch.manual_seed(0)
    model = mlp(1, 40, 40, 1)
    x = torch.linspace(-3, 3, 32).unsqueeze(1)
    y = torch.sin(2 * x)
    opt = load_optimizer(path, model.parameters())
    _train(model, opt, x, y, 3)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # a real checkpoint: serialised, not shared tensors
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert len(sd["state"]) == 6
    for s in sd["state"].values():
        assert s["step"] == 3
        assert ("momentum_buffer" in s) == (momentum > 0)

    resumed, fresh, restepped = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    opt_resumed = load_optimizer(path, resumed.parameters())
    opt_resumed.load_state_dict(sd)
    assert opt_resumed.bound.schedules == opt.bound.schedules
    opt_fresh = load_optimizer(path, fresh.parameters())  # no state: step 0, no buffers

    _train(model, opt, x, y, 5)  # crosses the horizon (steps 3..7, horizon 6)
    _train(resumed, opt_resumed, x, y, 5)
    _train(fresh, opt_fresh, x, y, 5)
    assert _same(model, resumed)
    assert all(s["step"] == 8 for s in opt_resumed.state.values())
    assert _max_diff(model, fresh) > 1e-3  # without the state the run differs: the test can fail

    # the step counter on its own matters (buffers kept, counter reset to 0)
    sd0 = copy.deepcopy(sd)
    for s in sd0["state"].values():
        s["step"] = 0
    opt_restepped = load_optimizer(path, restepped.parameters())
    opt_restepped.load_state_dict(sd0)
    _train(restepped, opt_restepped, x, y, 5)
    assert _max_diff(model, restepped) > 1e-3


def test_lr_multiplier_scales_the_first_step(tmp_path, spec_dict):
    config = LayerwiseConfig(init_lr=0.05, momentum=0.0, per_step=True, depth_bins=3)
    meta = make_meta(config, HORIZON, seed=4)
    path = save_optimizer(tmp_path / "o.safetensors", meta, config, spec_dict, SUMMARY)
    torch.manual_seed(1)
    model = mlp(2, 4, 1).double()  # float64 so the parameter differences are exact to ~1e-13
    x, y = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    deltas = {}
    for lr in (1.0, 0.25):
        m = copy.deepcopy(model)
        _train(m, load_optimizer(path, m.parameters(), lr=lr), x, y, 1)
        deltas[lr] = [q - p for p, q in zip(model.parameters(), m.parameters())]
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    # layer 0 of 2 sits at depth 0 (anchor 0), layer 1 at depth 1 (anchor 2); step t = 0
    th_eta, th_s = meta["log_step_size"].double(), meta["log_scale"].double()
    for i, p in enumerate(model.parameters()):
        role, anchor = i % 2, 0 if i < 2 else 2
        eff = math.exp(th_eta[role, anchor, 0] + th_s[role, anchor, 0])
        torch.testing.assert_close(deltas[1.0][i], -eff * p.grad, rtol=1e-9, atol=0)
        torch.testing.assert_close(deltas[0.25][i], 0.25 * deltas[1.0][i], rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- other shapes
@pytest.mark.parametrize("sizes,max_ratio", [
    ((3, 64, 64, 64, 2), 0.15),
    ((1, 8, 1), 0.15),
    ((4, 2), 0.35),  # a single nn.Linear: one layer, depth 0
])
def test_frozen_optimizer_trains_other_shapes(tmp_path, spec_dict, sizes, max_ratio):
    # trained for MLP 1-40-40-1 (the sine spec); applied to other depths and widths
    path = save_optimizer(tmp_path / "o.safetensors", make_meta(seed=3, spread=0.3), CONFIG, spec_dict, SUMMARY)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, sizes[0], generator=g)
    w = torch.randn(sizes[0], sizes[-1], generator=g)
    y = torch.sin(x @ w) + 0.5 * (x @ w)
    torch.manual_seed(0)
    model = mlp(*sizes)
    opt = load_optimizer(path, model.parameters())
    n_layers = len(sizes) - 1
    assert len(opt.param_groups) == 2 * n_layers
    assert [g["layer"] for g in opt.param_groups] == [i // 2 for i in range(2 * n_layers)]
    assert all(g["num_layers"] == n_layers for g in opt.param_groups)

    with torch.no_grad():
        loss0 = float(nn.functional.mse_loss(model(x), y))
    losses = []
    for _ in range(50):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(x), y))
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert final < max_ratio * loss0, (loss0, final)
    assert final < min(losses[:10])


def _expected_log(theta: torch.Tensor, depth: float) -> torch.Tensor:
    """Independent log-space interpolation of anchors ``theta`` (B, S) at ``depth``."""
    bins = theta.shape[0]
    if bins == 1:
        return theta[0]
    anchors = [b / (bins - 1) for b in range(bins)]
    for b in range(bins - 1):
        lo, hi = anchors[b], anchors[b + 1]
        if lo <= depth <= hi:
            f = (depth - lo) / (hi - lo)
            return (1 - f) * theta[b] + f * theta[b + 1]
    raise AssertionError(depth)


@pytest.mark.parametrize("bins", [1, 2, 3, 4])
def test_group_mapping_interpolates_anchors(tmp_path, spec_dict, bins):
    config = LayerwiseConfig(init_lr=0.01, momentum=0.9, per_step=True, depth_bins=bins)
    meta = make_meta(config, HORIZON, seed=5, spread=1.0)
    path = save_optimizer(tmp_path / "o.safetensors", meta, config, spec_dict, SUMMARY)
    model = mlp(2, 16, 16, 16, 16, 1)  # five layers: depths 0, .25, .5, .75, 1
    opt = load_optimizer(path, model.parameters())
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 5 and len(opt.param_groups) == 10
    th_eta, th_s = meta["log_step_size"].double(), meta["log_scale"].double()
    for layer, lin in enumerate(linears):
        depth = layer / 4
        for r, (role, p) in enumerate((("matrix", lin.weight), ("vector", lin.bias))):
            group = opt.param_groups[2 * layer + r]
            assert (group["role"], group["layer"], group["num_layers"]) == (role, layer, 5)
            assert len(group["params"]) == 1 and group["params"][0] is p
            step_sizes, scales = opt.bound.schedules[2 * layer + r]
            assert len(step_sizes) == len(scales) == HORIZON
            got_eta = torch.tensor(step_sizes, dtype=torch.float64)
            got_s = torch.tensor(scales, dtype=torch.float64)
            torch.testing.assert_close(got_eta, torch.exp(_expected_log(th_eta[r], depth)), rtol=1e-12, atol=0)
            torch.testing.assert_close(got_s, torch.exp(_expected_log(th_s[r], depth)), rtol=1e-12, atol=0)
    if bins == 3:
        # depth 0.25 is half way between anchors 0 and 0.5: the geometric mean of their step sizes
        eta0, eta1 = torch.exp(th_eta[0, 0]), torch.exp(th_eta[0, 1])
        torch.testing.assert_close(torch.tensor(opt.bound.schedules[2][0], dtype=torch.float64),
                                   torch.sqrt(eta0 * eta1), rtol=1e-12, atol=0)
        # the last layer sits exactly on the last anchor
        torch.testing.assert_close(torch.tensor(opt.bound.schedules[9][1], dtype=torch.float64),
                                   torch.exp(th_s[1, 2]), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- bad files
def _parts(spec_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a well-formed file, written out by hand (independent of save_optimizer)."""
    tensors = {k: v.contiguous() for k, v in make_meta(seed=6).items()}
    metadata = {"format": "metascale.optimizer", "format_version": "1", "rule": "layerwise",
                "rule_config": json.dumps(to_dict(CONFIG)), "group_mapping": json.dumps(MAPPING_RULE),
                "spec": json.dumps(spec_dict), "summary": json.dumps(SUMMARY)}
    return tensors, metadata


def test_hand_written_file_is_accepted(tmp_path, spec_dict):
    tensors, metadata = _parts(spec_dict)
    save_file(tensors, str(tmp_path / "ok.safetensors"), metadata=metadata)
    exp = read_optimizer(tmp_path / "ok.safetensors")
    assert exp.config == CONFIG and torch.equal(exp.meta["log_scale"], tensors["log_scale"])


def _set(d: dict, key: str, value) -> None:
    d[key] = value


def _cfg(**kw) -> str:
    return json.dumps({**to_dict(CONFIG), **kw})


S = HORIZON
BAD = {  # id: (mutate(tensors, metadata), expected substring of the message)
    "format_version": (lambda t, m: _set(m, "format_version", "999"), "version '999'"),
    "format_missing": (lambda t, m: m.pop("format"), "not a metascale optimizer file"),
    "format_other": (lambda t, m: _set(m, "format", "someone.else"), "not a metascale optimizer file"),
    "no_metadata": (lambda t, m: m.clear(), "not a metascale optimizer file"),
    "metadata_key_missing": (lambda t, m: m.pop("summary"), "missing ['summary']"),
    "metadata_key_extra": (lambda t, m: _set(m, "hook", "x"), "unexpected ['hook']"),
    "tensor_missing": (lambda t, m: t.pop("log_scale"), "expected exactly"),
    "tensor_extra": (lambda t, m: _set(t, "momentum", torch.zeros(2, 3, S)), "expected exactly"),
    "tensor_renamed": (lambda t, m: _set(t, "log_lr", t.pop("log_step_size")), "expected exactly"),
    "shape_mismatch": (lambda t, m: _set(t, "log_scale", t["log_scale"][:, :, :-1].contiguous()), "shape"),
    "shape_bins": (lambda t, m: _set(t, "log_scale", torch.zeros(2, 4, S)), "shape (2, 4, 6)"),
    "shape_bins_both": (lambda t, m: (_set(t, "log_scale", torch.zeros(2, 4, S)),
                                      _set(t, "log_step_size", torch.zeros(2, 4, S))), "shape (2, 4, 6)"),
    "shape_roles": (lambda t, m: (_set(t, "log_scale", torch.zeros(3, 3, S)),
                                  _set(t, "log_step_size", torch.zeros(3, 3, S))), "shape (3, 3, 6)"),
    "shape_rank": (lambda t, m: (_set(t, "log_scale", torch.zeros(2, 3 * S)),
                                 _set(t, "log_step_size", torch.zeros(2, 3 * S))), "shape (2, 18)"),
    "shape_not_per_step": (lambda t, m: _set(m, "rule_config", _cfg(per_step=False)), "expected (2, 3, 1)"),
    "float64": (lambda t, m: _set(t, "log_scale", t["log_scale"].double()), "dtype torch.float64"),
    "float16": (lambda t, m: (_set(t, "log_scale", t["log_scale"].half()),
                              _set(t, "log_step_size", t["log_step_size"].half())), "dtype torch.float16"),
    "nan": (lambda t, m: t["log_scale"].view(-1).__setitem__(4, math.nan), "non-finite"),
    "inf": (lambda t, m: t["log_step_size"].view(-1).__setitem__(0, -math.inf), "non-finite"),
    "overflow": (lambda t, m: t["log_step_size"].view(-1).__setitem__(3, 200.0), "overflow"),
    "rule_config_not_json": (lambda t, m: _set(m, "rule_config", "{init_lr: 0.01"), "'rule_config' is not valid JSON"),
    "rule_config_not_object": (lambda t, m: _set(m, "rule_config", "[0.01]"), "'rule_config' must be a JSON object"),
    "rule_config_unknown_key": (lambda t, m: _set(m, "rule_config", _cfg(lr_decay=0.5)), "unknown key 'lr_decay'"),
    "rule_config_out_of_range": (lambda t, m: _set(m, "rule_config", _cfg(momentum=2.0)), "momentum = 2.0 is not allowed"),
    "rule_config_inconsistent": (lambda t, m: _set(m, "rule_config", _cfg(momentum=0.0, nesterov=True)), "nesterov"),
    "group_mapping_changed": (lambda t, m: _set(m, "group_mapping", json.dumps({**MAPPING_RULE, "depth": "layer / L"})),
                              "group mapping rule differs"),
    "group_mapping_not_json": (lambda t, m: _set(m, "group_mapping", "roles"), "'group_mapping' is not valid JSON"),
    "spec_not_json": (lambda t, m: _set(m, "spec", "name = 'sine'"), "'spec' is not valid JSON"),
    "summary_not_object": (lambda t, m: _set(m, "summary", "3"), "'summary' must be a JSON object"),
    "unknown_rule": (lambda t, m: _set(m, "rule", "adamw"), "unknown rule 'adamw'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_raises(tmp_path, spec_dict, case):
    mutate, needle = BAD[case]
    tensors, metadata = _parts(spec_dict)
    mutate(tensors, metadata)
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(path), metadata=metadata or None)
    with pytest.raises(ExportFormatError) as info:
        read_optimizer(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)
    with pytest.raises(ExportFormatError):  # load_optimizer validates the same way
        load_optimizer(path, nn.Linear(2, 2).parameters())


def test_missing_path(tmp_path):
    with pytest.raises(ExportFormatError, match="no such file"):
        read_optimizer(tmp_path / "nope.safetensors")
    with pytest.raises(ExportFormatError, match="no such file"):
        read_optimizer(tmp_path)  # a folder is not a file


@pytest.mark.parametrize("cut", ["half", "zero", "seven", "minus_one", "header_only"])
def test_truncated_file(good, cut):
    path, _ = good
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    keep = {"half": len(data) // 2, "zero": 0, "seven": 7, "minus_one": len(data) - 1, "header_only": header}[cut]
    assert keep < len(data)
    path.write_bytes(data[:keep])
    with pytest.raises(ExportFormatError) as info:
        read_optimizer(path)
    assert "truncated or corrupted" in str(info.value)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_bytes(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(ExportFormatError, match="not a readable safetensors file"):
        read_optimizer(path)


def test_text_file(tmp_path):
    path = tmp_path / "sine.safetensors"
    path.write_bytes(SINE.read_bytes())
    with pytest.raises(ExportFormatError, match="truncated or corrupted"):
        read_optimizer(path)


def test_reading_never_unpickles(good, monkeypatch):
    path, meta = good

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    exp = read_optimizer(path)
    assert torch.equal(exp.meta["log_step_size"], meta["log_step_size"])
    opt = load_optimizer(path, nn.Linear(3, 2).parameters())
    assert isinstance(opt, LearnedOptimizer) and len(opt.param_groups) == 2


def test_tampered_spec_is_rejected(tmp_path, spec_dict):
    tensors, metadata = _parts(spec_dict)
    bad = json.loads(metadata["spec"])
    bad["family"]["name"] = "nope"
    bad["inner"]["steps"] = -5
    metadata["spec"] = json.dumps(bad)
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=metadata)
    with pytest.raises(ExportFormatError, match="spec"):
        read_optimizer(tmp_path / "s.safetensors")


def test_optimizer_of_an_unregistered_family_loads(tmp_path):
    """A file meta-trained on a family registered by the training process (in ``FAMILIES``)
    loads in a process that never registered it: the stored spec is a record. Drawing its
    tasks is refused with a message naming the family; a spec file with it stays an error."""
    from metascale.errors import SpecError
    spec = load_spec(Path(__file__).resolve().parent.parent / "tasks" / "sine.toml")
    data = spec.to_dict()
    data["family"] = {"name": "my_waves", "wavelength": [1, 2]}
    cfg = LayerwiseConfig()
    path = save_optimizer(tmp_path / "o.safetensors", init_meta(cfg, 20), cfg, data, {})
    exp = read_optimizer(path)
    assert exp.spec["family"] == data["family"]
    model = nn.Linear(3, 1)
    opt = load_optimizer(path, model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    record = spec_from_dict(data, "s", "stored", unknown_family_ok=True)
    assert record.to_dict()["family"] == data["family"]
    with pytest.raises(SpecError, match="'my_waves' is not registered"):
        record.sampler("train", 0)
    with pytest.raises(SpecError, match="name = 'my_waves' is not allowed"):
        spec_from_dict(data, "s", "spec file")
