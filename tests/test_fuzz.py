"""Fuzzing the three file loaders: 1500 mutated exported optimizers (layer-wise and adaptive),
learned losses and checkpoints, from a seeded generator.

Every case must either load or raise the loader's own error type (ExportFormatError /
CheckpointError, both MetascaleError); any other exception, a crash or a case slower than
``CASE_LIMIT_S`` fails. What "load" may return:

* checkpoints carry a SHA-256 digest, so a checkpoint that loads must hold exactly the original
  content;
* exported files carry no checksum (format version 1), so a flipped bit in a tensor's bytes or a
  metadata value edited into another valid value loads as that other, valid, file. Such a load
  must be self-consistent (written back with the official writer and read again, it gives the
  same content) and keep the original's tensor names, shapes and dtypes. Mutations that change
  nothing the file means (header key order, whitespace) must load the original content exactly.

Mutations: bit flips (anywhere / in the header / in the data), truncation, appended bytes, the
header-length field, header JSON edits (tensor entries dropped, added, renamed, re-typed,
re-shaped, re-offset with huge/negative/overlapping offsets; metadata keys dropped, added,
re-valued; non-JSON, deep nesting, huge integers, non-string values), and well-formed
safetensors files with wrong tensors or edited metadata (checkpoints: with a stale and with a
recomputed digest, to reach the checks behind the digest).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as serialise

from metascale.errors import CheckpointError, ExportFormatError, MetascaleError
from metascale.export import read_loss, read_optimizer, save_loss, save_optimizer
from metascale.losses import LossConfig, make_loss
from metascale.meta.checkpoint import Checkpoint, checkpoint_digest, read_checkpoint, run_identity, save_checkpoint
from metascale.optim import RULES, AdaptiveConfig

init_meta = RULES["layerwise"].init_meta


def init_net(cfg, seed=0):
    return RULES["adaptive-momentum" if cfg.momentum > 0 else "adaptive"].init_meta(cfg, 20, seed=seed)
from metascale.spec import load_spec

SEED = 20260521
CASES = {"optimizer": 400, "adaptive": 250, "loss": 350, "checkpoint": 500}  # 1500 in all
CASE_LIMIT_S = 5.0
SINE = Path(__file__).resolve().parent.parent / "tasks" / "sine.toml"


# --------------------------------------------------------------------------- the originals
@dataclasses.dataclass
class Kind:
    name: str
    data: bytes
    read: Callable[[Path], Any]
    content: Callable[[Any], dict]  # comparable content of what ``read`` returned
    rewrite: Callable[[Any, Path], Path]  # the official writer, for self-consistency
    error: type
    strict: bool  # a load must give the original content


def _tensors_of(d: dict[str, torch.Tensor]) -> dict:
    return {k: (str(v.dtype), tuple(v.shape), v.detach().contiguous().view(-1).view(torch.uint8).tolist())
            for k, v in d.items()}


def optimizer_kind(tmp: Path, name: str, config, meta: dict[str, torch.Tensor], spec: dict) -> Kind:
    summary = {"meta_steps": 7, "seed": 3, "first_meta_loss": 0.5, "note": "\u00e9\u03b7"}
    path = save_optimizer(tmp / f"{name}.safetensors", meta, config, spec, summary)
    return Kind(name, path.read_bytes(), read_optimizer,
                lambda e: {"meta": _tensors_of(e.meta), "rule": e.rule, "config": e.config, "spec": e.spec,
                           "summary": e.summary, "mapping": e.group_mapping},
                lambda e, p: save_optimizer(p, e.meta, e.config, e.spec, e.summary), ExportFormatError, False)


def loss_kind(tmp: Path, spec: dict) -> Kind:
    module = make_loss("regression", LossConfig(hidden=6), seed=2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01)  # no exact zeros: a flip is visible in every tensor
    path = save_loss(tmp / "loss.safetensors", module, spec, {"inner_lr": 0.05})
    return Kind("loss", path.read_bytes(), read_loss,
                lambda e: {"state": _tensors_of(e.module.state_dict()), "config": e.config, "kind": e.task_kind,
                           "spec": e.spec, "summary": e.summary},
                lambda e, p: save_loss(p, e.module, e.spec, e.summary), ExportFormatError, False)


def checkpoint_kind(tmp: Path, spec_obj) -> Kind:
    g = torch.Generator().manual_seed(1)
    meta = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init_meta(spec_obj.rules["optimizer"], 3).items()}
    loss = {k: v.detach().clone()
            for k, v in make_loss("regression", LossConfig(hidden=4), seed=1).state_dict().items()}
    adam = {f"{grp}.{k}": {"step": torch.tensor(2.0), "exp_avg": torch.randn(v.shape, generator=g),
                           "exp_avg_sq": torch.rand(v.shape, generator=g)}
            for grp, d in (("meta", meta), ("loss", loss)) for k, v in d.items()}
    ck = Checkpoint(run=run_identity(spec_obj.to_dict(), 0, "both", spec_obj.rules["optimizer"], LossConfig(hidden=4), None),
                    step=3, skipped=9, history=[0.5, None, 0.25], elapsed_s=1.5, device="cpu", meta=meta, loss=loss,
                    adam=adam, rng={"torch": torch.Generator().manual_seed(5).get_state()})
    path = save_checkpoint(tmp / "checkpoint.safetensors", ck)
    return Kind("checkpoint", path.read_bytes(), read_checkpoint,
                lambda c: {"run": c.run, "counts": (c.step, c.skipped, c.history, c.elapsed_s, c.device),
                           "meta": _tensors_of(c.meta), "loss": _tensors_of(c.loss), "rng": _tensors_of(c.rng),
                           "adam": {p: _tensors_of(s) for p, s in c.adam.items()}},
                lambda c, p: save_checkpoint(p, c), CheckpointError, True)


# --------------------------------------------------------------------------- safetensors pieces
def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: Any, body: bytes, **dump) -> bytes:
    text = (header if isinstance(header, (bytes, str)) else json.dumps(header, **dump))
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw + body


def parts(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / f"fuzz-parts-{id(data)}.safetensors"
    path.write_bytes(data)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    finally:
        path.unlink()


# --------------------------------------------------------------------------- mutations
JUNK = ["", "x", "null", "[]", "{}", "1", "-1", "1e999", "NaN", "\"\"", "{\"a\": 1}", "\u2603", "9" * 5000,
        "[" * 5000 + "]" * 5000, "{\"a\":" * 3000 + "1" + "}" * 3000, "true"]
DTYPES = ["F32", "F64", "F16", "BF16", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "U16", "XX", "", 3]
SHAPE_EDITS = [[], [0], [1], [2, 3, 3, 1], [-1], [2 ** 62], [1, 2 ** 40], "2", [1.5], None]
OFFSETS = [[0, 0], [0, 4], [-4, 8], [0, 2 ** 63], [2 ** 64 - 8, 2 ** 64], [8, 4], [0, 10 ** 30], "0", [0], [0, 1, 2]]


def json_value_edit(rng: random.Random, text: str) -> str:
    """Edit a JSON metadata value: drop/add/retype one key somewhere in it, or junk."""
    try:
        value = json.loads(text)
    except ValueError:
        return rng.choice(JUNK)
    dicts = []

    def walk(v):
        if isinstance(v, dict):
            dicts.append(v)
            for x in v.values():
                walk(x)
    walk(value)
    if not dicts or rng.random() < 0.15:
        return rng.choice(JUNK)
    d = rng.choice(dicts)
    op = rng.randrange(4)
    if op == 0 and d:
        d.pop(rng.choice(list(d)))
    elif op == 1:
        d[rng.choice(["extra", "name", "steps", "hidden", "kind"])] = rng.choice([1, "x", None, [1], {"a": 1}])
    elif op == 2 and d:
        d[rng.choice(list(d))] = rng.choice([None, "x", -1, 0, 10 ** 40, 1e308, [], {}, True, 0.5, [1, 2], "nan"])
    else:
        d[rng.choice(list(d)) if d else "k"] = rng.choice(JUNK)
    return json.dumps(value)


def mutate(rng: random.Random, kind: Kind) -> tuple[str, bytes, bool]:
    """``(label, bytes, neutral)``: one mutation of ``kind.data``; ``neutral`` ones must load to
    the original content."""
    data = kind.data
    header, body = split(data)
    n = 8 + struct.unpack("<Q", data[:8])[0]
    op = rng.randrange(16)
    if op == 0:  # bit flips anywhere
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return "flip", bytes(b), False
    if op == 1:  # bit flips in the header
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8, n)] ^= 1 << rng.randrange(8)
        return "flip_header", bytes(b), False
    if op == 2:  # bit flips in the tensor bytes
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(n, len(b))] ^= 1 << rng.randrange(8)
        return "flip_data", bytes(b), False
    if op == 3:
        return "truncate", data[:rng.randrange(len(data))], False
    if op == 4:
        return "append", data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), False
    if op == 5:
        value = rng.choice([0, 1, n - 9, n - 7, n + 1, len(data), len(data) + 1, 2 ** 31, 2 ** 63, 2 ** 64 - 1])
        return "header_length", struct.pack("<Q", value) + data[8:], False
    if op == 6:  # neutral: key order and whitespace
        items = list(header.items())
        rng.shuffle(items)
        text = json.dumps(dict(items), indent=rng.choice([None, 1, 4])) + " " * rng.randrange(9)
        return "reorder", join(text, body), True
    names = [k for k in header if k != "__metadata__"]
    h = json.loads(json.dumps(header))
    if op == 7:  # tensor entries: drop, duplicate, rename
        name = rng.choice(names)
        sub = rng.randrange(3)
        if sub == 0:
            del h[name]
        elif sub == 1:
            h[name + rng.choice(["_copy", ".x", ""]) + "2"] = dict(h[name])
        else:
            h[rng.choice(["", "meta", "loss.net", "adam.meta.x.step", "history2", "__x__", "w1 "]) + "z"] = h.pop(name)
        return "tensor_entry", join(h, body), False
    if op == 8:
        h[rng.choice(names)]["dtype"] = rng.choice(DTYPES)
        return "dtype", join(h, body), False
    if op == 9:
        h[rng.choice(names)]["shape"] = rng.choice(SHAPE_EDITS)
        return "shape", join(h, body), False
    if op == 10:
        h[rng.choice(names)]["data_offsets"] = rng.choice(OFFSETS)
        return "offsets", join(h, body), False
    if op == 11:  # metadata entries in the header
        meta = h.setdefault("__metadata__", {})
        sub = rng.randrange(6)
        if sub == 5:  # a whole value replaced by junk (huge integers, deep nesting, ...)
            meta[rng.choice(list(meta)) if meta else "format"] = rng.choice(JUNK)
        elif sub == 0 and meta:
            del meta[rng.choice(list(meta))]
        elif sub == 1:
            meta[rng.choice(["extra", "digest2", "Format", ""])] = "x"
        elif sub == 2 and meta:
            meta[rng.choice(list(meta))] = rng.choice([1, None, ["x"], {"a": "b"}])  # not a string
        elif sub == 3:
            h["__metadata__"] = rng.choice([None, [], "x", 1])
        else:
            key = rng.choice(list(meta)) if meta else "format"
            meta[key] = json_value_edit(rng, meta.get(key, "{}"))
        return "header_metadata", join(h, body), False
    if op == 12:  # not JSON, or JSON of the wrong type
        text = json.dumps(header)
        raw = rng.choice([text[:rng.randrange(len(text))], "[]", "null", "\"x\"", text.replace("{", "[", 1),
                          text + "}", "{" * 2000 + "}" * 2000, text.encode().decode("latin-1") + "\udc80"])
        return "header_json", join(raw.encode("utf-8", "surrogatepass"), body), False
    if op == 13:  # a JSON-valued metadata entry replaced by junk (huge integers, deep nesting, ...)
        tensors, meta = parts(kind.data)
        meta[rng.choice(sorted(k for k, v in meta.items() if v.startswith("{")))] = rng.choice(JUNK)
        if kind.strict and rng.random() < 0.6:
            meta["digest"] = checkpoint_digest(tensors, meta)
            return "json_junk_digest", serialise(tensors, meta), False
        return "json_junk", serialise(tensors, meta), False
    return valid_file_mutation(rng, kind)


def valid_file_mutation(rng: random.Random, kind: Kind) -> tuple[str, bytes, bool]:
    """A well-formed safetensors file with wrong tensors or edited metadata."""
    tensors, meta = parts(kind.data)
    sub = rng.randrange(10)
    name = rng.choice(sorted(tensors))
    if sub == 9:  # a whole metadata value replaced by junk (huge integers, deep nesting, ...)
        meta[rng.choice(sorted(meta)) if meta else "format"] = rng.choice(JUNK)
    elif sub == 0:
        del tensors[name]
    elif sub == 1:
        tensors[rng.choice(["extra", name + "x", "meta.extra", "adam.meta.log_scale.extra", "rng.cuda.x"])] = \
            torch.zeros(rng.randint(0, 3))
    elif sub == 2:
        tensors[name] = tensors[name].to(rng.choice([torch.float64, torch.float16, torch.int32, torch.bool,
                                                     torch.uint8, torch.bfloat16]))
    elif sub == 3:
        t = tensors[name]
        tensors[name] = rng.choice([t.reshape(-1), t.reshape(1, *t.shape), torch.zeros(0), torch.zeros(()) + 1,
                                    torch.cat([t.reshape(-1), t.reshape(-1)])]).to(t.dtype).contiguous()
    elif sub == 4 and tensors[name].is_floating_point() and tensors[name].numel():
        t = tensors[name].clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf, 1e30, -0.0, 200.0])
        tensors[name] = t
    elif sub == 5 and meta:
        meta.pop(rng.choice(sorted(meta)))
    elif sub == 6:
        meta[rng.choice(["extra", "digest", "format_version", "format"])] = rng.choice(["", "2", "x", "1",
                                                                                     "metascale.loss"])
    else:
        key = rng.choice(sorted(meta)) if meta else "format"
        meta[key] = json_value_edit(rng, meta.get(key, "{}"))
    label = "valid_file"
    if kind.strict and rng.random() < 0.6:  # reach the checks behind the digest
        meta["digest"] = checkpoint_digest(tensors, meta)
        label = "valid_file_digest"
    return label, serialise(tensors, meta or None), False


# --------------------------------------------------------------------------- the run
class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Kind]:
    tmp = tmp_path_factory.mktemp("originals")
    spec = load_spec(SINE)
    spec = dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, steps=3))
    g = torch.Generator().manual_seed(0)
    layerwise = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in init_meta(spec.rules["optimizer"], 3).items()}
    adaptive_cfg = AdaptiveConfig(hidden=4, table_steps=20)
    adaptive = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init_net(adaptive_cfg, seed=1).items()}
    return {"optimizer": optimizer_kind(tmp, "optimizer", spec.rules["optimizer"], layerwise, spec.to_dict()),
            "adaptive": optimizer_kind(tmp, "adaptive", adaptive_cfg, adaptive, spec.to_dict()),
            "loss": loss_kind(tmp, spec.to_dict()),
            "checkpoint": checkpoint_kind(tmp, spec)}


@pytest.mark.parametrize("name", list(CASES))
def test_mutated_files_load_or_raise_the_loaders_error(kinds, tmp_path, name):
    kind = kinds[name]
    original = kind.content(kind.read(_write(tmp_path / "original.safetensors", kind.data)))
    rng = random.Random(f"{SEED}-{name}")
    outcomes: dict[str, dict[str, int]] = {}
    failures = []
    use_alarm = hasattr(signal, "setitimer")
    old = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    try:
        for case in range(CASES[name]):
            label, data, neutral = mutate(rng, kind)
            path = _write(tmp_path / f"case{case % 4}.safetensors", data)
            t0 = time.monotonic()
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 4 * CASE_LIMIT_S)
            try:
                loaded = kind.read(path)
                outcome = "same" if kind.content(loaded) == original else "different"
            except Timeout:
                outcome, loaded = "timeout", None
            except kind.error as e:
                outcome, loaded = "raised", None
                assert str(e) and (str(path) in str(e) or "stored spec" in str(e)), (label, str(e))
            except Exception as e:  # noqa: BLE001 - exactly what the fuzz is for
                outcome, loaded = f"escaped {type(e).__name__}: {str(e)[:120]}", None
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.monotonic() - t0
            bad = outcome.startswith(("escaped", "timeout")) or elapsed > CASE_LIMIT_S \
                or (outcome == "different" and ((kind.strict and "digest" not in label) or neutral)) \
                or (outcome == "different" and not _self_consistent(kind, loaded, original, tmp_path))
            if bad:
                failures.append((case, label, outcome, round(elapsed, 3)))
            outcomes.setdefault(label, {}).setdefault(outcome.split(":")[0], 0)
            outcomes[label][outcome.split(":")[0]] += 1
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old)
    assert not failures, failures[:20]
    raised = sum(c.get("raised", 0) for c in outcomes.values())
    assert raised >= CASES[name] // 2, outcomes  # the fuzz reaches the validation, not only "same"
    assert all(o.get("same", 0) for label, o in outcomes.items() if label == "reorder"), outcomes
    print(name, json.dumps(outcomes))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _self_consistent(kind: Kind, loaded: Any, original: dict, tmp: Path) -> bool:
    """A changed export that loads: the same tensor names, shapes and dtypes, and written back
    by the official writer it reads back to the same content."""
    content = kind.content(loaded)
    first = next(k for k in ("meta", "state") if k in content)
    layout = {k: v[:2] for k, v in content[first].items()} == {k: v[:2] for k, v in original[first].items()}
    again = kind.content(kind.read(kind.rewrite(loaded, tmp / "rewritten.safetensors")))
    return layout and again == content


def test_the_originals_round_trip(kinds, tmp_path):
    for kind in kinds.values():
        loaded = kind.read(_write(tmp_path / f"{kind.name}.safetensors", kind.data))
        again = kind.read(kind.rewrite(loaded, tmp_path / f"{kind.name}-again.safetensors"))
        assert kind.content(again) == kind.content(loaded), kind.name
        assert issubclass(kind.error, MetascaleError)


# --------------------------------------------------------------------------- optimizer state_dicts
STATE_CASES = 1200


def _sd_optimizer(name: str, width: int, depth: int = 2, steps: int = 2, shift: float = 0.0, seed: int = 0):
    """A LearnedOptimizer of rule ``name`` on an MLP of ``depth`` layers of ``width``, after
    ``steps`` steps (``shift`` moves the meta-parameters: another file of the same rule)."""
    from metascale.optim import LearnedOptimizer
    rule = RULES[name]
    cfg = rule.resolve(rule.config_from(rule.config_type()), 5)
    meta = {k: v + shift for k, v in rule.init_meta(cfg, 5, seed=1).items()}
    gen = torch.Generator().manual_seed(seed)
    layers, d = [], 3
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(d, width), torch.nn.Tanh()]
        d = width
    model = torch.nn.Sequential(*layers, torch.nn.Linear(d, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    opt = LearnedOptimizer(model.parameters(), meta, cfg, total_steps=5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(6, 3, generator=gen)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _mutate_state_dict(rng: random.Random, sd: dict) -> tuple[str, dict]:
    import copy as _copy
    sd = _copy.deepcopy(sd)
    entries = [e for e in sd["state"].values()]
    op = rng.randrange(12)
    if op == 0 or not entries:
        return "same", sd
    e = rng.choice(entries)
    key = rng.choice(sorted(e))
    v = e[key]
    if op == 1:  # a tensor reshaped, resized, retyped, made non-contiguous, moved to meta
        if isinstance(v, torch.Tensor):
            e[key] = rng.choice([v.reshape(-1), v[..., :1] if v.dim() else v, torch.cat([v.reshape(-1)] * 2),
                                 v.double(), v.half(), v.long(), v.to(torch.complex64), v.to("meta"),
                                 v.t().contiguous().t() if v.dim() == 2 else v, torch.zeros(()), v.unsqueeze(0),
                                 v.to_sparse()])
        else:
            e[key] = rng.choice([-1, 1.5, "x", None, True, 2 ** 70, math.nan, torch.tensor(3), [1]])
    elif op == 2:
        e[key] = rng.choice([math.nan, math.inf, -1.0, 0.0, 1e300, -5, "1", None, [], {}])
    elif op == 3:
        del e[key]
    elif op == 4:
        e[rng.choice(["exp_avg", "momentum_buffer", "avg_sq_grad", "first_sq_grad", "step", "x"])] = \
            rng.choice([torch.zeros(1), 0.5, 3, torch.zeros(3, 3)])
    elif op == 5:  # the state of one parameter moved to another index
        ks = sorted(sd["state"])
        a, b = rng.choice(ks), rng.randrange(-2, len(ks) + 4)
        sd["state"][b] = sd["state"].pop(a)
    elif op == 6:
        g = rng.choice(sd["param_groups"])
        g[rng.choice(["lr", "foreach", "role", "layer", "num_layers", "last_scale", "betas", "params"])] = \
            rng.choice([math.nan, -1.0, 0.0, 2.0, None, True, "vector", 99, [0], [], "x", (0.9,)])
    elif op == 7:
        sd["param_groups"] = rng.choice([sd["param_groups"][:-1], sd["param_groups"] + sd["param_groups"][:1],
                                         list(reversed(sd["param_groups"])), [], "x"])
    elif op == 8:
        sd["metascale"] = rng.choice([{}, None, "layerwise", {**sd["metascale"], "rule": "adaptive"},
                                      {**sd["metascale"], "meta_digest": "0" * 64}, {"rule": sd["metascale"]["rule"]}])
    elif op == 9:
        sd.pop(rng.choice(["state", "param_groups", "metascale"]))
    elif op == 10:
        sd[rng.choice(["extra", "state"])] = rng.choice([[], None, {0: {}}, {"a": 1}])
    else:  # values scaled but well-formed: loads as equal state
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            e[key] = v * rng.choice([0.0, -2.0, 1e3])
        elif key != "step" and isinstance(v, float):
            e[key] = v * rng.choice([0.0, 2.0])
    return f"op{op}", sd


def _state_equal(opt, sd: dict) -> bool:
    """Whether ``opt`` now holds ``sd``'s state (tensors cast to the parameters' dtypes)."""
    mine = opt.state_dict()
    if mine["metascale"] != sd["metascale"] or mine["state"].keys() != sd["state"].keys():
        return False
    for i, entry in sd["state"].items():
        have = mine["state"][i]
        if have.keys() != entry.keys():
            return False
        for k, v in entry.items():
            h = have[k]
            if isinstance(v, torch.Tensor):
                if not torch.equal(h, v.to(dtype=h.dtype, device=h.device)):
                    return False
            elif h != v:
                return False
    skip = {"params"}
    return all({k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
               for a, b in zip(mine["param_groups"], sd["param_groups"]))


def state_dict_fuzz(cases: int = STATE_CASES, seed: int = SEED) -> dict:
    """Load ``cases`` mutated state_dicts (narrower, wider, deeper, other-rule, other-file and
    corrupted ones) into fresh optimizers; each loads to equal state (and then steps) or raises
    the library's error. Returns the outcome counts; raises AssertionError on anything else."""
    from metascale.errors import MetascaleError
    rng = random.Random(f"{seed}-state")
    rules = sorted(RULES)
    sources = []
    for name in rules:
        for width, depth in ((4, 2), (2, 2), (9, 2), (4, 3)):
            sources.append((name, width, depth, 0.0, _sd_optimizer(name, width, depth)[1].state_dict()))
        sources.append((name, 4, 2, 0.5, _sd_optimizer(name, 4, 2, shift=0.5)[1].state_dict()))
    outcomes: dict[str, int] = {}
    failures = []
    for case in range(cases):
        name = rng.choice(rules)
        same = [x for x in sources if x[:4] == (name, 4, 2, 0.0)]
        src = same[0] if rng.random() < 0.4 else rng.choice(sources)  # a loadable source often enough
        label, sd = _mutate_state_dict(rng, src[4])
        model, opt = _sd_optimizer(name, 4, 2, steps=rng.randrange(2))
        try:
            opt.load_state_dict(sd)
        except MetascaleError as e:
            assert "\n" not in str(e)
            outcomes["raised"] = outcomes.get("raised", 0) + 1
            continue
        except Exception as e:  # noqa: BLE001 - what the fuzz is for
            failures.append((case, label, src[:4], f"{type(e).__name__}: {str(e)[:100]}"))
            continue
        if not _state_equal(opt, sd):
            failures.append((case, label, src[:4], "loaded state differs"))
            continue
        opt.zero_grad()
        model(torch.randn(6, 3)).pow(2).mean().backward()
        try:
            opt.step()
        except Exception as e:  # noqa: BLE001
            failures.append((case, label, src[:4], f"step after load: {type(e).__name__}: {str(e)[:100]}"))
            continue
        outcomes["loaded"] = outcomes.get("loaded", 0) + 1
    assert not failures, failures[:10]
    return outcomes


def test_mutated_state_dicts_load_equal_or_raise_the_library_error():
    """In a child process, so that a crash (the fused kernel writing past a buffer) or a hang
    fails this test instead of killing pytest."""
    import subprocess
    import sys
    code = f"import json, test_fuzz; print(json.dumps(test_fuzz.state_dict_fuzz({STATE_CASES})))"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    outcomes = json.loads(out.stdout.strip().splitlines()[-1])
    assert sum(outcomes.values()) == STATE_CASES >= 1000
    assert outcomes.get("loaded", 0) >= 50 and outcomes.get("raised", 0) >= STATE_CASES // 2, outcomes
    print(outcomes)
