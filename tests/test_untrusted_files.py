"""Issue 15, item 2: sizes from untrusted files are checked before they are believed.

Every loader (exported optimizer, learned loss, checkpoint) checks each declared tensor's name,
dtype and shape against what the file's own metadata (rule config, horizon, loss config, run
identity) implies before it reads a tensor, so a small sparse file that declares a 3 GB tensor
is refused at once (before: 8.3 GB and 33 s for ``metascale info``; a checkpoint cost 3.3 GB).
Then finiteness, including the ``exp`` of every stored log value and of the effective step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from metascale.errors import CheckpointError, ExportFormatError, SpecError
from metascale.export import load_optimizer, read_loss, read_optimizer, save_loss, save_optimizer
from metascale.losses import LossConfig, make_loss
from metascale.meta.checkpoint import Checkpoint, read_checkpoint, run_identity, save_checkpoint
from metascale.optim import RULES, AdaptiveConfig, LayerwiseConfig
from metascale.spec import load_spec, spec_from_dict

SINE = Path(__file__).resolve().parent.parent / "tasks" / "sine.toml"
HUGE = 3 * 2 ** 30  # bytes declared by the sparse files
SECONDS, GROWTH_MB = 1.0, 200.0


def spec3():
    spec = load_spec(SINE)
    return dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, steps=3))


def originals(tmp: Path) -> dict[str, tuple[Path, str]]:
    """One valid file per loader: ``{kind: (path, tensor to inflate)}``."""
    spec = spec3()
    cfg = spec.rules["optimizer"]
    out = {"optimizer": (save_optimizer(tmp / "opt.safetensors", RULES["layerwise"].init_meta(cfg, 3), cfg,
                                        spec.to_dict(), {}), "log_scale")}
    acfg = AdaptiveConfig(hidden=4, table_steps=3)
    out["adaptive"] = (save_optimizer(tmp / "ada.safetensors", RULES["adaptive-momentum"].init_meta(acfg, 3), acfg,
                                      spec.to_dict(), {}), "table")
    out["loss"] = (save_loss(tmp / "loss.safetensors", make_loss("regression", LossConfig(hidden=4)), spec.to_dict(),
                             {}), "net.0.weight")
    meta = RULES["layerwise"].init_meta(cfg, 3)
    ck = Checkpoint(run=run_identity(spec.to_dict(), 0, "optimizer", cfg, None, None), step=1, skipped=0,
                    history=[0.5], elapsed_s=1.0, device="cpu", meta=meta, loss={},
                    adam={f"meta.{k}": {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(v),
                                        "exp_avg_sq": torch.zeros_like(v)} for k, v in meta.items()},
                    rng={"torch": torch.get_rng_state()})
    out["checkpoint"] = (save_checkpoint(tmp / "ck.safetensors", ck), "meta.log_scale")
    return out


def inflate(src: Path, dst: Path, name: str, nbytes: int = HUGE) -> Path:
    """A copy of ``src`` whose tensor ``name`` declares ``nbytes`` of float32 (two rows), laid
    out as safetensors wants (the other tensors packed in order, the big one last) and the file
    extended to fit by ``truncate``: a valid file, sparse (a few KB on disk)."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    packed, end = b"", 0
    for k, e in sorted(((k, e) for k, e in header.items() if k not in ("__metadata__", name)),
                       key=lambda kv: kv[1]["data_offsets"][0]):
        lo, hi = e["data_offsets"]
        packed += body[lo:hi]
        e["data_offsets"] = [end, end + hi - lo]
        end += hi - lo
    shape = [2, nbytes // 8]
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end + 4 * math.prod(shape)]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + packed)
        f.truncate(8 + len(raw) + header[name]["data_offsets"][1])
    return dst


LOADERS = {"optimizer": "read_optimizer", "adaptive": "read_optimizer", "loss": "read_loss",
           "checkpoint": "read_checkpoint"}
PROBE = textwrap.dedent("""
    import json, resource, sys, time
    from metascale.errors import MetascaleError
    from metascale.export import read_loss, read_optimizer
    from metascale.meta.checkpoint import read_checkpoint
    import metascale.cli
    loader, path = {"read_optimizer": read_optimizer, "read_loss": read_loss,
                    "read_checkpoint": read_checkpoint}[sys.argv[1]], sys.argv[2]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    try:
        loader(path)
        refused = None
    except MetascaleError as e:
        refused = str(e)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"refused": refused, "seconds": seconds, "growth_mb": peak - before, "peak_mb": peak,
                      "baseline_mb": before}))
""")


@pytest.mark.parametrize("kind", list(LOADERS))
def test_sparse_huge_tensor_is_refused_fast_and_small(tmp_path, kind):
    src, name = originals(tmp_path)[kind]
    path = inflate(src, tmp_path / f"huge-{kind}.safetensors", name)
    assert path.stat().st_size > HUGE - 2 ** 20
    if hasattr(path.stat(), "st_blocks"):
        assert path.stat().st_blocks * 512 < 2 ** 20  # sparse: the file holds no 3 GB
    out = subprocess.run([sys.executable, "-c", PROBE, LOADERS[kind], str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(kind, res)  # peak RSS includes torch's own ~220 MB; the growth is what the refusal cost
    assert res["refused"] and ("does not imply" in res["refused"] or "expected" in res["refused"]), res
    assert res["seconds"] < SECONDS and res["growth_mb"] < GROWTH_MB, res


@pytest.mark.parametrize("kind", list(LOADERS))
def test_the_originals_still_load(tmp_path, kind):
    src, _ = originals(tmp_path)[kind]
    {"read_optimizer": read_optimizer, "read_loss": read_loss, "read_checkpoint": read_checkpoint}[LOADERS[kind]](src)


def _layerwise_file(tmp_path, step: float, scale: float, horizon: int = 3) -> Path:
    spec = spec3()
    cfg = LayerwiseConfig(momentum=0.0)
    meta = RULES["layerwise"].init_meta(cfg, horizon)
    meta = {"log_step_size": torch.full_like(meta["log_step_size"], step),
            "log_scale": torch.full_like(meta["log_scale"], scale)}
    return save_optimizer(tmp_path / "f.safetensors", meta, cfg, spec.to_dict(), {}, horizon=horizon)


@pytest.mark.parametrize("step, scale, needle", [(0.0, 100.0, "exp(log_scale) overflows"),
                                                 (100.0, 0.0, "exp(log_step_size) overflows"),
                                                 (60.0, 60.0, "effective step")])
def test_overflowing_exp_is_refused(tmp_path, step, scale, needle):
    """exp(60) is finite in float32, exp(120) is not: such a file made every parameter NaN on
    the first step, silently."""
    path = _layerwise_file(tmp_path, step, scale)
    with pytest.raises(ExportFormatError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_optimizer(path)


def test_largest_finite_effective_step_loads(tmp_path):
    path = _layerwise_file(tmp_path, 40.0, 40.0)  # exp(80) = 5.5e34: finite, absurd, but the user's choice
    read_optimizer(path)


def test_adaptive_weights_that_give_nan_factors_are_refused(tmp_path):
    """+-3e38 weights: the linear path sums to inf - inf = NaN, tanh(NaN) = NaN; before, the file
    loaded and the first step set every parameter to NaN."""
    spec = spec3()
    cfg = AdaptiveConfig(hidden=4, table_steps=3)
    meta = RULES["adaptive-momentum"].init_meta(cfg, 3)
    meta["wl"] = torch.tensor([[3e38, -3e38, 3e38, 0, 0, 0, 0], [0.0] * 7])
    path = save_optimizer(tmp_path / "a.safetensors", meta, cfg, spec.to_dict(), {})
    with pytest.raises(ExportFormatError, match="beyond 1e\\+30"):
        read_optimizer(path)
    meta["wl"] = torch.full((2, 7), 1e29)  # below the cap: every factor finite
    path = save_optimizer(tmp_path / "b.safetensors", meta, cfg, spec.to_dict(), {})
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    opt = load_optimizer(path, model.parameters())
    model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()
    assert all(math.isfinite(g["last_step_size"]) and math.isfinite(g["last_scale"]) for g in opt.param_groups)


def test_schedule_length_must_match_the_stored_horizon(tmp_path):
    path = _layerwise_file(tmp_path, -3.0, 0.0, horizon=3)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["horizon"] = "5"
    raw = json.dumps(header).encode()
    bad = tmp_path / "h5.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ExportFormatError, match="horizon 5"):
        read_optimizer(bad)


def test_horizon_past_the_cap_is_refused(tmp_path):
    spec = spec3().to_dict()
    spec["inner"]["windows"] = 1_000_000  # windows * steps = 3,000,000: once 240 GB of schedules and states
    with pytest.raises(SpecError, match="windows \\* steps"):
        spec_from_dict(spec, "s", "spec")
    path = _layerwise_file(tmp_path, -3.0, 0.0, horizon=3)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["horizon"] = "200000"
    raw = json.dumps(header).encode()
    bad = tmp_path / "big.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ExportFormatError, match="horizon '200000' is not an integer in \\[1, 100000\\]"):
        read_optimizer(bad)


def test_checkpoint_of_another_rule_shape_is_refused_before_reading(tmp_path):
    """The run identity says layer-wise at horizon 3; a tensor shaped for horizon 5 is refused from
    the header (before: the digest was computed over every tensor first)."""
    src, _ = originals(tmp_path)["checkpoint"]
    path = inflate(src, tmp_path / "ck5.safetensors", "adam.meta.log_scale.exp_avg", nbytes=4 * 2 * 3 * 5)
    with pytest.raises(CheckpointError, match="declares shape"):
        read_checkpoint(path)
