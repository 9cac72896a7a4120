"""Issue 15, item 1: a ``state_dict`` loaded into an exported optimizer is checked before
anything is written (shapes, dtypes, devices, per-group statistics, the rule and the
meta-parameters it came from), and the fused kernel only sees buffers laid out like their
parameters. Before: a narrower model's state made ``step()`` corrupt the heap (SIGSEGV or
SIGABRT), another rule's state loaded and then raised ``KeyError``, file A's state silently
drove file B, and a non-contiguous buffer silently gave other updates."""
from __future__ import annotations

import copy
import io
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from metascale.errors import MetascaleError, StateError
from metascale.optim import RULES, LearnedOptimizer

HORIZON = 5


def config(name: str):
    rule = RULES[name]
    cfg = rule.config_type()  # defaults: momentum 0.9 where the rule has one
    return rule.resolve(rule.config_from(cfg), HORIZON)


def meta_of(name: str, shift: float = 0.0):
    meta = RULES[name].init_meta(config(name), HORIZON, seed=1)
    return {k: v + shift for k, v in meta.items()}


def model(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))


def trained(name: str, width: int = 3, steps: int = 2, shift: float = 0.0, seed: int = 0):
    m = model(width, seed)
    opt = LearnedOptimizer(m.parameters(), meta_of(name, shift), config(name), total_steps=HORIZON)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
        opt.step()
    return m, opt


def train_steps(m, opt, steps: int = 2, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


RULE_NAMES = list(RULES)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_narrower_state_into_wider_model_is_refused(name):
    _, small = trained(name, width=3)
    wide, opt = trained(name, width=300, steps=0)
    before = copy.deepcopy(opt.state_dict())
    if not RULES[name].buffers:  # per-group scalars only: nothing of the parameters' size to mismatch
        opt.load_state_dict(small.state_dict())
        assert opt.state_dict()["state"] == small.state_dict()["state"]
    else:
        with pytest.raises(StateError, match="another size|another shape"):
            opt.load_state_dict(small.state_dict())
        assert repr(opt.state_dict()) == repr(before)  # nothing was written
    after = train_steps(wide, opt)
    assert all(torch.isfinite(p).all() for p in after)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_wider_and_deeper_states_are_refused(name):
    _, wide = trained(name, width=30)
    _, opt = trained(name, width=3, steps=0)
    if RULES[name].buffers:
        with pytest.raises(StateError):
            opt.load_state_dict(wide.state_dict())
    torch.manual_seed(0)
    deep = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    other = LearnedOptimizer(deep.parameters(), meta_of(name), config(name), total_steps=HORIZON)
    with pytest.raises(StateError, match="group"):
        opt.load_state_dict(other.state_dict())


def test_the_narrower_state_crashed_the_process_before():
    """The failure the issue reports, in a child process: torch's own load_state_dict accepts a
    narrower model's state and the fused kernel then writes past the buffers' end. With the check
    the child exits 0 having been refused."""
    code = textwrap.dedent("""
        import torch, torch.nn as nn, sys
        from metascale.optim import RULES, LearnedOptimizer
        from metascale.errors import StateError
        rule = RULES["layerwise"]; cfg = rule.config_type(momentum=0.9); meta = rule.init_meta(cfg, 5)
        def mk(w):
            torch.manual_seed(0); return nn.Sequential(nn.Linear(4, w), nn.Tanh(), nn.Linear(w, 1))
        a, b = mk(3), mk(3000)
        oa = LearnedOptimizer(a.parameters(), meta, cfg, total_steps=5)
        a(torch.randn(8, 4)).pow(2).mean().backward(); oa.step()
        ob = LearnedOptimizer(b.parameters(), meta, cfg, total_steps=5)
        try:
            ob.load_state_dict(oa.state_dict())
        except StateError:
            print("refused")
        b(torch.randn(8, 4)).pow(2).mean().backward(); ob.step()
        print("stepped", all(bool(p.isfinite().all()) for p in b.parameters()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split() == ["refused", "stepped", "True"]


@pytest.mark.parametrize("pair", [("layerwise", "adaptive-momentum"), ("adaptive-momentum", "layerwise"),
                                  ("adaptive", "adaptive-momentum"), ("adaptive-momentum", "adaptive")])
def test_state_of_another_rule_is_refused(pair):
    _, src = trained(pair[0])
    _, dst = trained(pair[1], steps=0)
    with pytest.raises(StateError, match="rule"):
        dst.load_state_dict(src.state_dict())


@pytest.mark.parametrize("name", RULE_NAMES)
def test_state_of_another_file_is_refused(name):
    """File A's state must not drive file B's meta-parameters (same rule, same model)."""
    _, a = trained(name, shift=0.0)
    _, b = trained(name, shift=0.01, steps=0)
    with pytest.raises(StateError, match="other meta-parameters"):
        b.load_state_dict(a.state_dict())
    _, a2 = trained(name, shift=0.0, steps=0)
    a2.load_state_dict(a.state_dict())  # the same file, another instance: fine


@pytest.mark.parametrize("name", RULE_NAMES)
def test_round_trip_through_torch_save_continues_exactly(name):
    m, opt = trained(name)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only: the identity is plain strings
    m2 = copy.deepcopy(m)
    opt2 = LearnedOptimizer(m2.parameters(), meta_of(name), config(name), total_steps=HORIZON)
    opt2.load_state_dict(saved)
    assert torch.equal(torch.cat([p.flatten() for p in train_steps(m, opt)]),
                       torch.cat([p.flatten() for p in train_steps(m2, opt2)]))


def test_non_contiguous_buffers_give_the_same_updates():
    """A transposed-then-transposed-back (non-contiguous) buffer of equal values: before, the
    fused kernel read it as if contiguous and the updates differed; now the loaded buffer is laid
    out like its parameter and the trajectory is bit-for-bit the contiguous one's."""
    m, opt = trained("layerwise", width=6)
    sd = opt.state_dict()
    odd = copy.deepcopy(sd)
    for entry in odd["state"].values():
        b = entry["momentum_buffer"]
        if b.dim() == 2:
            entry["momentum_buffer"] = b.t().contiguous().t()  # same values, transposed strides
    assert any(not e["momentum_buffer"].is_contiguous() for e in odd["state"].values())
    results = []
    for state in (sd, odd):
        m2 = copy.deepcopy(m)
        o2 = LearnedOptimizer(m2.parameters(), meta_of("layerwise"), config("layerwise"), total_steps=HORIZON)
        o2.load_state_dict(copy.deepcopy(state))
        assert all(o2.state[p]["momentum_buffer"].stride() == p.stride() for p in m2.parameters())
        results.append(torch.cat([p.flatten() for p in train_steps(m2, o2)]))
    assert torch.equal(results[0], results[1])


def test_float64_buffers_are_cast_like_torch_does():
    m, opt = trained("layerwise")
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["momentum_buffer"] = entry["momentum_buffer"].double()
    opt.load_state_dict(sd)
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in m.parameters())


def test_a_buffer_set_by_hand_never_reaches_the_fused_kernel():
    """Past load_state_dict (state edited directly): a wrong-sized buffer gives torch's
    RuntimeError from the checked path instead of a write past the buffer's end."""
    m, opt = trained("layerwise", width=300)
    opt.state[m[0].weight]["momentum_buffer"] = torch.zeros(3)
    opt.zero_grad()
    m(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError):
        opt.step()


def _edit(sd, fn):
    sd = copy.deepcopy(sd)
    fn(sd)
    return sd


def _first_state(sd):
    return sd["state"][min(sd["state"])]


BAD = {
    "no identity": lambda sd: sd.pop("metascale"),
    "extra top-level key": lambda sd: sd.update(extra=1),
    "identity not a dict": lambda sd: sd.update(metascale="layerwise"),
    "lr nan": lambda sd: sd["param_groups"][0].update(lr=math.nan),
    "lr negative": lambda sd: sd["param_groups"][0].update(lr=-1.0),
    "lr a string": lambda sd: sd["param_groups"][0].update(lr="1"),
    "role swapped": lambda sd: sd["param_groups"][0].update(role="vector"),
    "unknown group key of a tensor": lambda sd: sd["param_groups"][0].update(betas=torch.zeros(2)),
    "unknown group key of nan": lambda sd: sd["param_groups"][0].update(initial_lr=math.nan),
    "params not ints": lambda sd: sd["param_groups"][0].update(params=["a"] * len(sd["param_groups"][0]["params"])),
    "param listed twice": lambda sd: sd["param_groups"][1].update(params=list(sd["param_groups"][0]["params"])),
    "state of an unknown param": lambda sd: sd["state"].update({99: {"step": 1}}),
    "step negative": lambda sd: _first_state(sd).update(step=-1),
    "step a float": lambda sd: _first_state(sd).update(step=1.5),
    "step a bool": lambda sd: _first_state(sd).update(step=True),
    "another rule's key": lambda sd: _first_state(sd).update(exp_avg=torch.zeros(1)),
    "buffer a list": lambda sd: _first_state(sd).update(momentum_buffer=[0.0]),
    "buffer integer": lambda sd: _first_state(sd).update(
        momentum_buffer=_first_state(sd)["momentum_buffer"].long()),
    "buffer complex": lambda sd: _first_state(sd).update(
        momentum_buffer=_first_state(sd)["momentum_buffer"].to(torch.complex64)),
    "buffer on meta": lambda sd: _first_state(sd).update(
        momentum_buffer=_first_state(sd)["momentum_buffer"].to("meta")),
    "buffer flattened": lambda sd: _first_state(sd).update(
        momentum_buffer=_first_state(sd)["momentum_buffer"].flatten()),
    "buffer sparse": lambda sd: _first_state(sd).update(
        momentum_buffer=_first_state(sd)["momentum_buffer"].to_sparse()),
    "state not a dict": lambda sd: sd["state"].update({min(sd["state"]): [1]}),
}
ADAPTIVE_BAD = {
    "stat negative": lambda sd: _first_state(sd).update(avg_sq_grad=-1.0),
    "stat nan": lambda sd: _first_state(sd).update(first_sq_grad=math.nan),
    "stat a tensor": lambda sd: _first_state(sd).update(first_sq_grad=torch.tensor([1.0, 2.0])),
}


@pytest.mark.parametrize("case", list(BAD) + list(ADAPTIVE_BAD))
def test_malformed_state_dicts_are_refused_before_anything_is_written(case):
    name = "adaptive-momentum"
    m, opt = trained(name)
    sd = _edit(opt.state_dict(), {**BAD, **ADAPTIVE_BAD}[case])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(StateError) as info:
        opt.load_state_dict(sd)
    assert isinstance(info.value, MetascaleError) and "\n" not in str(info.value) and len(str(info.value)) < 400
    assert repr(opt.state_dict()) == repr(before)


@pytest.mark.parametrize("lr", [math.nan, math.inf, -math.inf, -1.0, "0.1", True])
def test_bad_lr_is_refused(lr):
    with pytest.raises(ValueError, match="learning rate"):
        LearnedOptimizer(model(3).parameters(), meta_of("layerwise"), config("layerwise"), total_steps=5, lr=lr)


@pytest.mark.parametrize("param", [torch.zeros(3, 3, dtype=torch.complex64), torch.zeros(3, 3, device="meta"),
                                   torch.zeros(3, dtype=torch.int64)])
def test_complex_meta_and_integer_parameters_get_a_clear_error(param):
    with pytest.raises(ValueError, match="real floating-point parameters"):
        LearnedOptimizer([param], meta_of("layerwise"), config("layerwise"), total_steps=5)


# --------------------------------------------------------------------------- issue 15, item 3
@pytest.mark.parametrize("name", ["adaptive", "adaptive-momentum"])
def test_groups_start_stop_and_restart_receiving_gradients(name):
    """Progressive unfreezing: the first, a middle and the last group get no gradient for some
    steps (never yet, or for a while). Before: the last group raised KeyError 'first_sq_grad' and
    the first one reset every group's step counter to 1. Each group's counter counts exactly the
    steps it took, the others' never move back, and every step is finite."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                      nn.Linear(6, 1))
    opt = LearnedOptimizer(m.parameters(), meta_of(name), config(name), total_steps=20)
    groups = opt.param_groups
    first, middle, last = 0, len(groups) // 2, len(groups) - 1
    silent = {first: range(0, 4), middle: range(3, 7), last: range(0, 9)}  # steps without gradients
    taken = [0] * len(groups)
    gen = torch.Generator().manual_seed(1)
    for t in range(12):
        opt.zero_grad()
        m(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
        for k, steps in silent.items():
            if t in steps:
                for p in groups[k]["params"]:
                    p.grad = None
        before = [opt.state[g["params"][0]].get("step", 0) for g in groups]
        opt.step()
        for k, g in enumerate(groups):
            live = not (k in silent and t in silent[k])
            taken[k] += live
            assert opt.state[g["params"][0]].get("step", 0) == before[k] + live, (t, k)
            if live:
                stats = opt.state[g["params"][0]]
                assert math.isfinite(stats["avg_sq_grad"]) and math.isfinite(stats["first_sq_grad"])
        assert all(torch.isfinite(p).all() for p in m.parameters()), t
    assert [opt.state[g["params"][0]]["step"] for g in groups] == taken
    assert taken[first] == 8 and taken[middle] == 8 and taken[last] == 3 and taken[1] == 12


def test_a_state_dict_saved_with_an_lr_scheduler_loads():
    m, opt = trained("layerwise")
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # adds initial_lr to every group
    m2, opt2 = copy.deepcopy(m), None
    opt2 = LearnedOptimizer(m2.parameters(), meta_of("layerwise"), config("layerwise"), total_steps=HORIZON)
    opt2.load_state_dict(opt.state_dict())
    assert all(g["initial_lr"] == 1.0 for g in opt2.param_groups)
