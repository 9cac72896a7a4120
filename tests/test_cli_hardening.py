"""Issue 15, items 4-7 and issue 16's `--force`: one writer per output folder, one error line
and exit code 2 for every expected failure, capped command-line sizes, output paths checked
before any work, strict JSON, and a run whose every task diverged exports nothing.

Each test reproduces a failure the issue lists (a traceback, a silent overwrite, an
unbounded size, a late failure) and states what happens now."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from metascale import cli
from metascale.cli import main
from metascale.meta.checkpoint import checkpoint_digest, read_checkpoint
from metascale.runlock import NAME, FolderLocked, folder_lock
from test_cli import assert_error, argparse_exit, run, tiny_spec

REPO = Path(__file__).resolve().parent.parent


def train(capsys, spec: Path, out: Path, *extra) -> int:
    code, _, err = run(capsys, "meta-train", "--spec", spec, "--out", out, "--quiet", "--device", "cpu", *extra)
    assert code == 0 or extra, err
    return code


# --------------------------------------------------------------------------- 5: one line, exit code 2
def test_unwritable_and_over_long_out(capsys, tmp_path):
    spec = tiny_spec(tmp_path)
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", "/proc/metascale-test/run"], "/proc/metascale-test",
                 "No such file or directory")
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / ("x" * 300)], "File name too long")
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", spec / "sub"], "Not a directory")


def test_full_disk_during_a_checkpoint_write(capsys, tmp_path, monkeypatch):
    """ENOSPC while writing the checkpoint: one line, exit 2, and the previous checkpoint intact."""
    spec, out = tiny_spec(tmp_path), tmp_path / "run"
    train(capsys, spec, out, "--checkpoint-every", "1")
    before = (out / "checkpoint.safetensors").read_bytes()
    import metascale.meta.checkpoint as ck

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(ck, "_write_atomic", full)
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", out, "--quiet", "--device", "cpu", "--resume",
                          "--meta-steps", "4", "--checkpoint-every", "1"], "No space left on device",
                 "checkpoint.safetensors")
    assert (out / "checkpoint.safetensors").read_bytes() == before
    assert read_checkpoint(out / "checkpoint.safetensors").step == 2


def test_deeply_nested_toml(capsys, tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    assert_error(capsys, ["meta-train", "--spec", path, "--out", tmp_path / "o"], "nested too deeply")


def test_momentum_rule_with_zero_momentum(capsys, tmp_path):
    spec = tiny_spec(tmp_path, adaptive={"momentum": 0.0})
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "o", "--rule", "adaptive-momentum",
                          "--quiet"], "needs [adaptive] momentum > 0")


def test_absurd_horizon(capsys, tmp_path):
    spec = tiny_spec(tmp_path, inner={"windows": 1_000_000})
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "o"], "windows * steps", "at most 100000")


def test_garbage_rng_state_with_a_valid_digest(capsys, tmp_path):
    spec, out = tiny_spec(tmp_path), tmp_path / "run"
    train(capsys, spec, out)
    path = out / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        t, m = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    t["rng.torch"].fill_(7)
    m["digest"] = checkpoint_digest(t, m)
    save_file(t, str(path), metadata=m)
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", out, "--resume", "--quiet", "--device", "cpu"],
                 "'rng.torch' is not valid")


@pytest.mark.parametrize("name, text, needle", [
    ("metrics.jsonl", '{"meta_step": 0, "meta_loss": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "not valid JSON"),
    ("metrics.jsonl", '{"meta_step": 0, "meta_loss": 1' + "0" * 5000 + "}\n", "not a metrics record"),
    ("metrics.jsonl", '{"meta_step": 0, "meta_loss": 1' + "0" * 400 + "}\n", "not a metrics record"),
    ("eval.json", "[" * 100_000 + "]" * 100_000, "not readable JSON"),
    ("eval.json", '{"optimizers": {"x": {"median_curve": [1' + "0" * 5000 + "]}}}", None),
])
def test_report_on_deep_or_huge_json(capsys, tmp_path, name, text, needle):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"meta_step": 0, "meta_loss": 0.5}\n', encoding="utf-8")
    (run_dir / name).write_text(text, encoding="utf-8")
    if needle:
        assert_error(capsys, ["report", run_dir, "--quiet"], needle)
    else:  # a 5,000-digit loss is read as inf, drawn as a gap (before: ValueError traceback)
        code, out, err = run(capsys, "report", run_dir, "--quiet")
        assert code == 0 and (run_dir / "report.md").exists(), err


def test_error_lines_are_cut_to_a_readable_length(capsys, tmp_path):
    spec = tiny_spec(tmp_path)
    text = spec.read_text(encoding="utf-8").replace("[inner]", "[inner]\n" + "k" * 2_000_000 + " = 1", 1)
    spec.write_text(text, encoding="utf-8")
    err = assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "o"], "unknown key")
    assert len(err) < 450


def test_one_line_joins_lines_and_clips():
    assert cli.one_line("a\nb\r\n  c") == "a b c"
    assert len(cli.one_line("x" * 10_000)) == 400


# --------------------------------------------------------------------------- 6: sizes and outputs first
@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "f.safetensors", "--spec", "s.toml", "--tasks", str(10 ** 12)], "--tasks: expected an integer in"),
    (["evaluate", "f.safetensors", "--spec", "s.toml", "--steps", str(10 ** 7)], "--steps: expected an integer in"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--meta-steps", str(10 ** 9)], "--meta-steps: expected"),
])
def test_command_line_sizes_have_the_spec_caps(capsys, argv, needle):
    t0 = time.perf_counter()
    code, out, err = argparse_exit(capsys, *argv)
    assert code == 2 and needle in err and out == ""
    assert time.perf_counter() - t0 < 30  # refused at parse time (was: 37 MB/s growth, no output)


def test_evaluate_json_path_is_checked_before_the_evaluation(capsys, tmp_path, monkeypatch):
    spec, out = tiny_spec(tmp_path), tmp_path / "run"
    train(capsys, spec, out)
    import metascale.evaluate as ev

    def never(*a, **k):
        raise AssertionError("the evaluation ran before the --json path was checked")
    monkeypatch.setattr(ev, "evaluate", never)
    for bad, needle in (("/proc/metascale-test/eval.json", "No such file or directory"),
                        (str(tmp_path / ("y" * 300) / "eval.json"), "File name too long"),
                        (str(tmp_path / ("y" * 300 + ".json")), "File name too long"),
                        ("", "--json: empty path")):
        assert_error(capsys, ["evaluate", out / "optimizer.safetensors", "--spec", spec, "--json", bad], needle)
    assert not (tmp_path / "eval.json").exists()


# --------------------------------------------------------------------------- 7: smaller
def test_empty_out_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_error(capsys, ["meta-train", "--spec", tiny_spec(tmp_path), "--out", ""], "--out: empty path")
    assert_error(capsys, ["report", tmp_path, "--out", "  "], "--out: empty path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_eval_json_is_strict_json(tmp_path):
    path = tmp_path / "e.json"
    cli._write_json(path, {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": 2.5}, "e": (math.nan,)})

    def refuse(name):
        raise AssertionError(f"{name} in eval.json")
    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": None, "b": [1.0, None, None],
                                                                   "c": {"d": 2.5}, "e": [None]}
    assert [p.name for p in tmp_path.iterdir()] == ["e.json"]  # no temporary file left


def test_run_whose_every_task_diverged_exports_nothing(capsys, tmp_path):
    spec = tiny_spec(tmp_path, optimizer={"init_lr": 100.0})
    out = tmp_path / "run"
    err = assert_error(capsys, ["meta-train", "--spec", spec, "--out", out, "--quiet", "--device", "cpu"],
                       "every task of all 2 meta-step(s) diverged", "--allow-diverged")
    assert not (out / "optimizer.safetensors").exists() and (out / "metrics.jsonl").exists(), err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["meta_loss"] for r in records] == [None, None]
    code, stdout, _ = run(capsys, "meta-train", "--spec", spec, "--out", out, "--quiet", "--device", "cpu",
                          "--force", "--allow-diverged")
    assert code == 0 and (out / "optimizer.safetensors").exists() and "warning" in stdout


# --------------------------------------------------------------------------- issue 16: --out of a finished run
def test_non_empty_out_needs_resume_or_force(capsys, tmp_path):
    spec, out = tiny_spec(tmp_path), tmp_path / "run"
    train(capsys, spec, out)
    for derived in ("eval.json", "report.md", "meta_loss.png", "schedules.png", "heldout.png"):
        (out / derived).write_text("from the previous run")
    (out / "notes.txt").write_text("mine")
    before = (out / "optimizer.safetensors").read_bytes()
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", out, "--quiet", "--seed", "1"],
                 "holds checkpoint.safetensors", "--resume", "--force")
    assert (out / "optimizer.safetensors").read_bytes() == before and (out / "eval.json").exists()
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", out, "--resume", "--force"], "give one")
    assert train(capsys, spec, out, "--seed", "1", "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "metrics.jsonl", "notes.txt",
                                                     "optimizer.safetensors"]
    assert (out / "optimizer.safetensors").read_bytes() != before


# --------------------------------------------------------------------------- 4: one writer per folder
def test_folder_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with folder_lock(tmp_path):
        assert (tmp_path / NAME).read_text() == str(os.getpid())
        with pytest.raises(FolderLocked, match=f"PID {os.getpid()} is writing"):
            with folder_lock(tmp_path):
                pass
    assert not (tmp_path / NAME).exists()
    with folder_lock(tmp_path):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / NAME).write_text(dead.stdout.strip())
    with folder_lock(tmp_path):
        assert (tmp_path / NAME).read_text() == str(os.getpid())


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "metascale.cli", *argv]


def test_two_concurrent_meta_trains_on_one_out(tmp_path):
    """The first holds the folder; the second exits 2 with one line and touches nothing; the first
    is killed (its lock is stale), and --resume takes the folder over and finishes the run."""
    spec, out = tiny_spec(tmp_path, meta={"steps": 400}), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METASCALE_JOBS": "1"}
    args = ["meta-train", "--spec", str(spec), "--out", str(out), "--quiet", "--device", "cpu",
            "--checkpoint-every", "1"]
    first = subprocess.Popen(_cli(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.safetensors").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        metrics = (out / "metrics.jsonl").read_bytes()
        second = subprocess.run(_cli(*args, "--force"), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"PID {first.pid} is writing" in second.stderr, second.stderr
        assert (out / "metrics.jsonl").read_bytes()[:len(metrics)] == metrics  # untouched by the second
        assert first.poll() is None  # still running, unharmed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / NAME).read_text() == str(first.pid)  # a stale lock of a dead process
    step = read_checkpoint(out / "checkpoint.safetensors").step
    resumed = subprocess.run(_cli(*args, "--resume", "--meta-steps", str(step + 2)), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from the checkpoint at meta-step {step}" in resumed.stdout
    assert read_checkpoint(out / "checkpoint.safetensors").step == step + 2
    assert not (out / NAME).exists()
