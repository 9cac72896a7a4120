"""Resumable meta-training: runs SIGKILLed at several points (one inside a checkpoint write)
and resumed end exactly where an uninterrupted run ends; the checkpoint file round-trips
bitwise and every wrong checkpoint is refused with a CheckpointError naming the problem."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metascale.cli import main
from metascale.errors import CheckpointError
from metascale.losses import LossConfig
from metascale.meta import MetaTrainer
from metascale.meta.checkpoint import (FORMAT, FORMAT_VERSION, Checkpoint, checkpoint_digest, open_metrics,
                                       read_checkpoint, restore, run_identity, save_checkpoint)
from metascale.optim import LayerwiseConfig
from metascale.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
STEPS = 14
SPEC = f"""description = "checkpoint test: small sine MLP"
[family]
name = "sine"
hidden = [40, 40]
[inner]
steps = 5
[meta]
batch_size = 2
steps = {STEPS}
"""
# kills the CLI inside its second checkpoint write: the new file is written and fsync-ed under
# its temporary name, the rename has not happened
KILL_IN_WRITE = """
import os, signal, sys
from pathlib import Path
real, calls = os.replace, []
def replace(src, dst, *args, **kwargs):
    if Path(dst).name == "checkpoint.safetensors":
        calls.append(dst)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from metascale.cli import main
sys.exit(main(sys.argv[1:]))
"""


def records(path: Path) -> list[dict]:
    """The metrics records without the wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in path.read_text().splitlines()]


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def cli(*args: str, script: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic as the in-process reference
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "metascale.cli"]
    return subprocess.Popen([*head, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def kill_after(proc: subprocess.Popen, metrics: Path, n: int, timeout: float = 120.0) -> int:
    """SIGKILL ``proc`` as soon as ``metrics`` holds ``n`` lines; returns the count seen."""
    t0 = time.monotonic()
    while lines(metrics) < n:
        assert proc.poll() is None, f"run ended before {n} metrics lines: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() - t0 < timeout, "no progress"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return lines(metrics)


def test_killed_and_resumed_runs_end_bitwise_equal(tmp_path, capsys):
    spec = tmp_path / "small.toml"
    spec.write_text(SPEC)
    base = ["meta-train", "--spec", str(spec), "--quiet", "--device", "cpu", "--seed", "3"]
    # the uninterrupted reference, in-process (the autouse fixture runs it on one thread)
    assert main([*base, "--out", str(tmp_path / "ref"), "--checkpoint-every", "0"]) == 0
    assert not (tmp_path / "ref" / "checkpoint.safetensors").exists()
    capsys.readouterr()

    out = tmp_path / "run"
    ckpt, metrics = out / "checkpoint.safetensors", out / "metrics.jsonl"
    run = [*base, "--out", str(out), "--checkpoint-every", "1"]
    # 1) killed once 2 records are out: a checkpoint of meta-step >= 1 exists (it precedes record 2)
    seen = kill_after(cli(*run), metrics, 2)
    steps = [read_checkpoint(ckpt).step]
    assert 1 <= steps[-1] <= seen
    # 2) resumed, killed 2 records later than the file held (the resume first cuts it back)
    seen = kill_after(cli(*run, "--resume"), metrics, seen + 2)
    steps.append(read_checkpoint(ckpt).step)
    assert steps[-2] < steps[-1] <= seen
    # 3) resumed, killed inside its second checkpoint write (between fsync and rename):
    #    the previous checkpoint stays intact, the torn temporary file is left behind
    proc = cli(*run, "--resume", script=KILL_IN_WRITE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    steps.append(read_checkpoint(ckpt).step)
    assert steps[-1] == steps[-2] + 1  # the first write of run 3 landed, the second did not
    assert lines(metrics) == steps[-1] + 1  # the record of the step whose checkpoint was lost
    leftovers = list(out.glob("checkpoint.safetensors.*.tmp"))
    assert len(leftovers) == 1 and read_checkpoint(leftovers[0]).step == steps[-1] + 1
    # 4) resumed to the end
    proc = cli(*run, "--resume")
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"resumed from the checkpoint at meta-step {steps[-1]}" in stdout
    assert not list(out.glob("*.tmp"))  # the next write removed the leftover

    with safe_open(str(tmp_path / "ref" / "optimizer.safetensors"), "pt") as a, \
            safe_open(str(out / "optimizer.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
        summary = json.loads(b.metadata()["summary"])
    assert records(metrics) == records(tmp_path / "ref" / "metrics.jsonl")
    assert [r["meta_step"] for r in records(metrics)] == list(range(STEPS))
    assert summary["resumed_from_meta_step"] == steps[-1] and summary["meta_steps"] == STEPS
    final = read_checkpoint(ckpt)
    assert final.step == STEPS and final.history == [r["meta_loss"] for r in records(metrics)]


# --------------------------------------------------------------------------- in-process
def small_spec(steps: int = 4):
    spec = load_spec(REPO / "tasks" / "sine.toml")
    return dataclasses.replace(spec, family=dataclasses.replace(spec.family, hidden=(8,), n_val=20),
                               inner=dataclasses.replace(spec.inner, steps=3),
                               meta=dataclasses.replace(spec.meta, batch_size=2, steps=steps))


def train(tmp_path: Path, steps: int, *, every: int = 1, resume: bool = False, seed: int = 0, learn: str = "optimizer",
          spec=None, name: str = "run"):
    trainer = MetaTrainer(spec or small_spec(), seed=seed, device="cpu", progress=False, meta_steps=steps, learn=learn)
    return trainer.train(tmp_path / name / "metrics.jsonl", checkpoint_path=tmp_path / name / "ck.safetensors",
                         checkpoint_every=every, resume=resume)


@pytest.mark.parametrize("learn", ["optimizer", "both"])
def test_resume_in_process_is_bitwise(tmp_path, learn):
    """Meta-parameters, learned-loss weights and both Adam groups carry over exactly; the
    checkpoint cadence (every 2, and the last step) does not change the numbers."""
    ref = train(tmp_path, 5, every=0, learn=learn, name="ref")
    train(tmp_path, 3, every=2, learn=learn)  # a finished 3-step run, extended to 5 below
    assert read_checkpoint(tmp_path / "run" / "ck.safetensors").step == 3  # the last step is always saved
    res = train(tmp_path, 5, every=2, learn=learn, resume=True)
    for k in ref.meta:
        assert torch.equal(ref.meta[k], res.meta[k]), k
    if learn == "both":
        for (k, a), b in zip(ref.loss.state_dict().items(), res.loss.state_dict().values()):
            assert torch.equal(a, b), k
        ck = read_checkpoint(tmp_path / "run" / "ck.safetensors")
        assert {p.split(".")[0] for p in ck.adam} == {"meta", "loss"} and ck.loss
    assert records(tmp_path / "run" / "metrics.jsonl") == records(tmp_path / "ref" / "metrics.jsonl")
    assert res.summary["resumed_from_meta_step"] == 3
    assert {k: v for k, v in res.summary.items() if k not in ("wall_time_s", "resumed_from_meta_step")} == \
        {k: v for k, v in ref.summary.items() if k != "wall_time_s"}
    # resuming a finished run does no work and returns the same result
    again = train(tmp_path, 5, learn=learn, resume=True)
    assert all(torch.equal(again.meta[k], ref.meta[k]) for k in ref.meta)


def test_round_trip_is_bitwise(tmp_path):
    train(tmp_path, 2)
    path = tmp_path / "run" / "ck.safetensors"
    ck = read_checkpoint(path)
    assert (ck.step, ck.skipped, len(ck.history), ck.device) == (2, 0, 2, "cpu")
    assert ck.run["seed"] == 0 and ck.run["learn"] == "optimizer" and ck.run["rule"] == "layerwise"
    assert ck.run["spec"] == json.loads(json.dumps(small_spec().to_dict()))
    assert all(float(s["step"]) == 2 for s in ck.adam.values()) and sorted(ck.adam) == ["meta.log_scale",
                                                                                      "meta.log_step_size"]
    assert ck.rng["torch"].dtype == torch.uint8 and ck.rng["torch"].shape == torch.get_rng_state().shape
    copy = save_checkpoint(tmp_path / "copy" / "ck.safetensors", ck)
    back = read_checkpoint(copy)
    assert dataclasses.asdict(back).keys() == dataclasses.asdict(ck).keys()
    for field in ("run", "step", "skipped", "history", "elapsed_s", "device"):
        assert getattr(back, field) == getattr(ck, field), field
    for field in ("meta", "loss", "rng"):
        a, b = getattr(ck, field), getattr(back, field)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert all(torch.equal(ck.adam[p][k], back.adam[p][k]) for p in ck.adam for k in ck.adam[p])
    with safe_open(str(copy), "pt") as a, safe_open(str(path), "pt") as b:  # the same content digest
        assert a.metadata()["digest"] == b.metadata()["digest"]


def test_history_with_fully_skipped_steps_round_trips(tmp_path):
    ck = Checkpoint(run=run_identity(small_spec().to_dict(), 0, "optimizer", LayerwiseConfig(), None, None),
                    step=3, skipped=2, history=[0.5, None, -1.25], elapsed_s=1.0, device="cpu",
                    meta={"log_step_size": torch.zeros(2, 3, 3), "log_scale": torch.ones(2, 3, 3)}, loss={},
                    adam={f"meta.{k}": {"step": torch.tensor(2.0), "exp_avg": torch.full((2, 3, 3), 0.5),
                                        "exp_avg_sq": torch.full((2, 3, 3), 0.25)}
                          for k in ("log_step_size", "log_scale")},
                    rng={"torch": torch.get_rng_state()})
    back = read_checkpoint(save_checkpoint(tmp_path / "c.safetensors", ck))
    assert back.history == [0.5, None, -1.25] and back.skipped == 2


# --------------------------------------------------------------------------- refusals
def rewrite(path: Path, *, tensors=None, metadata=None, digest: bool = True) -> Path:
    """Rewrite a checkpoint with edited tensors/metadata; a valid digest unless ``digest=False``."""
    with safe_open(str(path), "pt") as f:
        t, m = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if tensors:
        tensors(t)
    if metadata:
        metadata(m)
    if digest:
        m["digest"] = checkpoint_digest(t, m)
    out = path.with_name("edited.safetensors")
    save_file(t, str(out), metadata=m)
    return out


def _edit_json(key: str, **changes):
    def edit(m):
        d = json.loads(m[key])
        d.update(changes)
        m[key] = json.dumps(d)
    return edit


def _set_spec(**inner):
    def edit(m):
        run = json.loads(m["run"])
        run["spec"]["inner"].update(inner)
        m["run"] = json.dumps(run)
    return edit


@pytest.fixture
def ckpt(tmp_path) -> Path:
    train(tmp_path, 2)
    return tmp_path / "run" / "ck.safetensors"


BAD = {  # id: (rewrite kwargs, substring of the message)
    "version": (dict(metadata=lambda m: m.update(format_version="2")),
                "format version '2'; this metascale reads version '1'"),
    "format": (dict(metadata=lambda m: m.update(format="metascale.optimizer")), "not a metascale checkpoint file"),
    "digest": (dict(metadata=lambda m: m.update(torch_version="0.0"), digest=False), "do not match the stored digest"),
    "bit_flip": (dict(tensors=lambda t: t["meta.log_scale"].view(-1).__setitem__(0, 1e-3), digest=False),
                 "do not match the stored digest"),
    "key_missing": (dict(metadata=lambda m: m.pop("progress")), "missing ['progress']"),
    "key_extra": (dict(metadata=lambda m: m.update(note="x")), "unexpected ['note']"),
    "tensor_extra": (dict(tensors=lambda t: t.update({"momentum.x": torch.zeros(2)})),
                     "unexpected tensor 'momentum.x'"),
    "history_missing": (dict(tensors=lambda t: t.pop("history")), "'history' missing"),
    "history_length": (dict(tensors=lambda t: t.update(history=torch.zeros(5, dtype=torch.float64))), "history"),
    "history_dtype": (dict(tensors=lambda t: t.update(history=t["history"].float())), "dtype torch.float32"),
    "meta_nan": (dict(tensors=lambda t: t["meta.log_scale"].view(-1).__setitem__(0, math.nan)), "non-finite"),
    "adam_missing": (dict(tensors=lambda t: t.pop("adam.meta.log_scale.exp_avg_sq")), "Adam state of 'meta.log_scale'"),
    "adam_step": (dict(tensors=lambda t: t.update({"adam.meta.log_scale.step": torch.tensor(7.0)})), "Adam step count"),
    "adam_shape": (dict(tensors=lambda t: t.update({"adam.meta.log_scale.exp_avg": torch.zeros(3)})),
                   "'adam.meta.log_scale.exp_avg' declares shape (3,), which its run"),  # refused before reading
    "adam_orphan": (dict(tensors=lambda t: t.update({"adam.meta.lr.step": torch.tensor(2.0)})),
                    "'adam.meta.lr.step' declares shape (), which its run"),
    "rng": (dict(tensors=lambda t: t.update({"rng.torch": torch.zeros(3, dtype=torch.uint8)})), "'rng.torch' declares"),
    "rng_garbage": (dict(tensors=lambda t: t["rng.torch"].fill_(7)), "'rng.torch' is not valid: Invalid mt19937 state"),
    "progress_keys": (dict(metadata=_edit_json("progress", extra=1)), "metadata 'progress' has keys"),
    "progress_value": (dict(metadata=_edit_json("progress", step=-1)), "progress"),
    "skipped_count": (dict(metadata=_edit_json("progress", skipped=99)), "99 skipped tasks do not fit"),
    "run_not_json": (dict(metadata=lambda m: m.update(run="{spec:")), "metadata 'run' is not valid JSON"),
    "run_learn": (dict(metadata=_edit_json("run", learn="everything")), "is not valid"),
    "run_spec": (dict(metadata=_set_spec(steps=0)), "steps = 0 is not allowed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_refused(ckpt, case):
    kwargs, needle = BAD[case]
    path = rewrite(ckpt, **kwargs)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_truncated_and_missing(ckpt, tmp_path):
    data = ckpt.read_bytes()
    for keep in (0, 7, 100, len(data) // 2, len(data) - 1):
        ckpt.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            read_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        read_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("case", ["seed", "spec", "learn", "rule", "past_end"])
def test_other_run_is_refused(ckpt, tmp_path, case):
    """restore() refuses a checkpoint of another run, naming what differs; nothing is loaded."""
    spec = small_spec()
    meta = {"log_step_size": torch.zeros(2, 3, 3), "log_scale": torch.zeros(2, 3, 3)}
    adam = torch.optim.Adam(list(meta.values()))
    args = dict(spec=spec.to_dict(), seed=0, learn="optimizer", rule=spec.rules["optimizer"], loss_config=None, inner_lr=None)
    needle = {"seed": "seed differs (checkpoint 0, this run 5)",
              "spec": "spec.inner.objective differs (checkpoint \"log_mean\", this run \"final\")",
              "learn": "learn differs (checkpoint \"optimizer\", this run \"both\")",
              "rule": "rule_config.momentum differs (checkpoint 0.9, this run 0.5)",
              "past_end": "at meta-step 2, past the 1 meta-steps asked for"}[case]
    if case == "seed":
        args["seed"] = 5
    elif case == "spec":
        args["spec"] = dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, objective="final")).to_dict()
    elif case == "learn":
        args.update(learn="both", loss_config=LossConfig())
    elif case == "rule":
        args["rule"] = dataclasses.replace(spec.rules["optimizer"], momentum=0.5)
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, run_identity(**args), meta, None, adam, 1 if case == "past_end" else 10)
    assert needle in str(info.value), str(info.value)
    assert all(not v.any() for v in meta.values()) and not adam.state  # untouched


def test_renamed_spec_still_resumes(ckpt):
    spec = small_spec().to_dict()
    spec.update(name="renamed", description="a copy under another name")
    meta = {"log_step_size": torch.zeros(2, 3, 3), "log_scale": torch.zeros(2, 3, 3)}
    adam = torch.optim.Adam(list(meta.values()))
    ck = restore(ckpt, run_identity(spec, 0, "optimizer", small_spec().rules["optimizer"], None, None), meta, None, adam, 10)
    assert torch.equal(meta["log_scale"], ck.meta["log_scale"]) and adam.state


def test_fields_added_since_compare_at_their_defaults(ckpt, tmp_path):
    """A checkpoint written before a config field existed (its run lacks the key) resumes a run
    that has the field at its default: an upgrade does not refuse runs in flight."""
    def drop(m):
        run = json.loads(m["run"])
        del run["spec"]["inner"]["tail_share"], run["rule_config"]["nesterov"]
        m["run"] = json.dumps(run)
    old = rewrite(ckpt, metadata=drop)
    assert "tail_share" not in json.loads(safe_open(str(old), "pt").metadata()["run"])["spec"]["inner"]
    spec = small_spec()
    meta = {"log_step_size": torch.zeros(2, 3, 3), "log_scale": torch.zeros(2, 3, 3)}
    adam = torch.optim.Adam(list(meta.values()))
    ck = restore(old, run_identity(spec.to_dict(), 0, "optimizer", spec.rules["optimizer"], None, None), meta, None,
                 adam, 10)
    assert ck.step == 2 and torch.equal(meta["log_scale"], ck.meta["log_scale"])
    other = dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, tail_share=0.5))
    with pytest.raises(CheckpointError, match="spec.inner.tail_share differs"):
        restore(old, run_identity(other.to_dict(), 0, "optimizer", spec.rules["optimizer"], None, None), meta, None,
                adam, 10)


def test_trainer_refusals_and_stale_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(tmp_path, 2, resume=True)
    with pytest.raises(ValueError, match="checkpoint_path"):
        MetaTrainer(small_spec(), device="cpu", progress=False).train(resume=True)
    train(tmp_path, 2)
    with pytest.raises(CheckpointError, match="seed differs"):
        train(tmp_path, 3, resume=True, seed=1)
    # the metrics file lost records the checkpoint counts on
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    with pytest.raises(CheckpointError, match="holds no record of meta-step 1"):
        train(tmp_path, 3, resume=True)
    # a fresh run never leaves an earlier run's checkpoint behind to resume into
    (tmp_path / "run" / "ck.safetensors").write_bytes(b"stale")
    train(tmp_path, 1, every=0)
    assert not (tmp_path / "run" / "ck.safetensors").exists()


def test_open_metrics_cuts_after_the_checkpoint_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"meta_step": i}) + "\n" for i in range(4)) + '{"meta_st')
    with open_metrics(path, 2) as f:
        f.write('{"meta_step": 2}\n')
    assert path.read_text() == '{"meta_step": 0}\n{"meta_step": 1}\n{"meta_step": 2}\n'
    with pytest.raises(CheckpointError, match="holds no record of meta-step 3"):
        open_metrics(path, 5)


def test_file_names_the_format(ckpt):
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    assert (meta["format"], meta["format_version"]) == (FORMAT, FORMAT_VERSION) == ("metascale.checkpoint", "1")
    assert len(meta["digest"]) == 64
