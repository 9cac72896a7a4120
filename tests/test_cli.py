"""The command line, driven in-process through ``metascale.cli.main``: help, a tiny end-to-end
run (meta-train -> evaluate -> info) and the error paths (exit code 2, one-line message)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from metascale.cli import main
from metascale.export import read_optimizer, save_optimizer
from metascale.optim.groups import MAPPING_RULE
from metascale.optim import RULES, LayerwiseConfig

init_meta = RULES["layerwise"].init_meta
from metascale.spec import load_spec

REPO = Path(__file__).parent.parent
TASKS = REPO / "tasks"
SINE = TASKS / "sine.toml"
OPTIMIZERS = ("learned", "sgd", "sgd_momentum", "adam")
BASELINES = ("sgd", "sgd_momentum", "adam")




def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def dump_toml(data: dict) -> str:
    """Minimal TOML writer for a spec: top-level scalars, then one level of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def tiny_spec(tmp_path: Path, name: str = "tiny", **tables) -> Path:
    """A copy of tasks/sine.toml with tiny meta-training/evaluation budgets; ``tables`` patches it."""
    data = tomllib.loads(SINE.read_text(encoding="utf-8"))
    data["meta"].update(steps=2, batch_size=2)
    data["inner"].update(steps=3)
    data["evaluate"].update(tasks=3, tune_tasks=2, points_per_decade=1)
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(capsys, argv, *needles: str) -> str:
    """``main(argv)`` returns 2 and prints exactly one line ``metascale: error: ...`` naming the problem."""
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("metascale: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def argparse_exit(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv,needles", [
    ([], ["Meta-train layer-wise learnable optimizers", "tasks", "meta-train", "evaluate", "info"]),
    (["tasks"], ["List the specs in a folder", "--dir"]),
    (["meta-train"], ["Meta-train, then export", "optimizer.safetensors", "--spec", "--out", "--meta-steps", "--seed"]),
    (["evaluate"], ["Evaluate an exported optimizer on held-out tasks", "tuned", "--tasks", "--json"]),
    (["info"], ["Describe an exported optimizer file"]),
])
def test_help(capsys, argv, needles):
    code, out, err = argparse_exit(capsys, *argv, "--help")
    assert code == 0 and err == ""
    assert out.startswith("usage: metascale")
    flat = " ".join(out.split())  # argparse wraps lines
    for needle in needles:
        assert needle in flat, needle


# --------------------------------------------------------------------------- tasks
def test_tasks_lists_every_spec(capsys):
    code, out, err = run(capsys, "tasks", "--dir", TASKS)
    assert code == 0 and err == ""
    files = sorted(TASKS.glob("*.toml"))
    lines = out.splitlines()
    assert len(files) >= 1 and len(lines) == len(files)
    for f, line in zip(files, lines):
        data = tomllib.loads(f.read_text(encoding="utf-8"))
        assert line.startswith(str(f))
        assert line.endswith(data["description"])
        inner = data.get("inner", {})
        windows = f"x{inner['windows']}" if inner.get("windows", 1) > 1 else ""
        assert f"[{data['family']['name']}, K={inner.get('steps', 20)}{windows}]" in line
    sine = next(line for line in lines if line.startswith(str(SINE)))
    assert "[sine, K=20]" in sine and "Sine-wave regression, MAML protocol" in sine


def test_tasks_console_module_runs():
    proc = subprocess.run([sys.executable, "-m", "metascale.cli", "tasks", "--dir", str(TASKS)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert str(SINE) in proc.stdout and "[sine, K=20]" in proc.stdout


def test_tasks_errors(capsys, tmp_path):
    assert_error(capsys, ["tasks", "--dir", tmp_path], str(tmp_path), "holds no *.toml")
    assert_error(capsys, ["tasks", "--dir", tmp_path / "nope"], "no such folder")
    (tmp_path / "bad.toml").write_text('description = "x"\n[family]\nname = "nope"\n')
    assert_error(capsys, ["tasks", "--dir", tmp_path], "bad.toml", "name = 'nope' is not allowed")


# --------------------------------------------------------------------------- end to end
def test_meta_train_evaluate_info(capsys, tmp_path):
    spec_path = tiny_spec(tmp_path)
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "meta-train", "--spec", spec_path, "--out", out_dir, "--quiet", "--seed", 1)
    assert code == 0, err
    opt_file, metrics = out_dir / "optimizer.safetensors", out_dir / "metrics.jsonl"
    assert f"wrote {opt_file}" in out and "meta-trained tiny for 2 meta-steps" in out

    exp = read_optimizer(opt_file)
    spec = load_spec(spec_path)
    assert exp.config == spec.rules["optimizer"] and exp.spec == spec.to_dict() and exp.horizon == 3
    assert exp.meta["log_step_size"].shape == (2, 3, 3)
    assert exp.summary["meta_steps"] == 2 and exp.summary["seed"] == 1 and exp.summary["skipped_tasks"] == 0
    # meta-training moved the parameters away from the unit init
    assert not torch.equal(exp.meta["log_step_size"], init_meta(spec.rules["optimizer"], 3)["log_step_size"])

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(records) == 2
    for i, rec in enumerate(records):
        assert {"meta_step", "meta_loss", "meta_grad_norm", "learned"} <= set(rec)
        assert rec["meta_step"] == i
        assert math.isfinite(rec["meta_loss"]) and rec["meta_grad_norm"] > 0
        assert set(rec["learned"]) == {"matrix", "vector"}
        assert np.shape(rec["learned"]["matrix"]["step_size"]) == (3, 3)
    assert records[0]["meta_loss"] == exp.summary["first_meta_loss"]
    # the last record describes the exported meta-parameters
    for r, role in enumerate(("matrix", "vector")):
        torch.testing.assert_close(torch.tensor(records[-1]["learned"][role]["step_size"]),
                                   torch.exp(exp.meta["log_step_size"][r]), rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.tensor(records[-1]["learned"][role]["scale"]),
                                   torch.exp(exp.meta["log_scale"][r]), rtol=1e-6, atol=0)

    # the same seed reproduces the same optimizer
    code, _, err = run(capsys, "meta-train", "--spec", spec_path, "--out", tmp_path / "again", "--quiet", "--seed", 1)
    assert code == 0, err
    again = read_optimizer(tmp_path / "again" / "optimizer.safetensors")
    for k in exp.meta:
        if exp.summary["device"] == "cpu":
            assert torch.equal(again.meta[k], exp.meta[k]), k
        else:  # GPU kernels need not be bitwise reproducible
            torch.testing.assert_close(again.meta[k], exp.meta[k], rtol=1e-5, atol=1e-7)

    # evaluate
    json_path = tmp_path / "eval" / "out.json"
    code, out, err = run(capsys, "evaluate", opt_file, "--spec", spec_path, "--json", json_path, "--quiet")
    assert code == 0, err
    assert f"wrote {json_path}" in out
    for name in OPTIMIZERS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    result = json.loads(json_path.read_text())
    assert (result["tasks"], result["steps"], result["seed"], result["file"]) == (3, 3, 0, str(opt_file))
    np.testing.assert_allclose(result["lr_grid"], [1e-4, 1e-3, 1e-2, 1e-1, 1.0], rtol=1e-12)
    assert set(result["optimizers"]) == set(OPTIMIZERS)
    for name in OPTIMIZERS:
        row = result["optimizers"][name]
        assert "median_steps_to_adam" in row
        finals = row["final_losses"]
        assert len(finals) == 3 and all(math.isfinite(v) for v in finals)
        assert row["median_final_loss"] == pytest.approx(float(np.median(finals)), rel=1e-12)
        q25, q75 = np.percentile(finals, [25, 75])
        assert row["iqr_final_loss"] == pytest.approx(q75 - q25, rel=1e-9, abs=1e-12)
        assert row["iqr_final_loss"] >= 0
        assert (name in BASELINES) == ("tuned_lr" in row)
        if name in BASELINES:
            assert row["tuned_lr"] in result["lr_grid"]
    # Adam reaches its own final loss on every task, within T steps
    adam = result["optimizers"]["adam"]
    assert adam["reached_adam_fraction"] == 1.0 and 1 <= adam["median_steps_to_adam"] <= 3

    # info
    code, out, err = run(capsys, "info", opt_file)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{opt_file}: metascale optimizer, rule layerwise, format version 2"
    assert "meta-trained on: tiny (" in out and "group mapping rule:" in out
    for key, value in MAPPING_RULE.items():
        assert f"  {key}: {value}" in lines
    assert "learned schedules over 3 step(s)" in out
    for r, role in enumerate(("matrix", "vector")):
        for b, depth in enumerate(("0.00", "0.50", "1.00")):
            eta, s = torch.exp(exp.meta["log_step_size"][r, b]), torch.exp(exp.meta["log_scale"][r, b])
            shown = ", ".join(f"{x:.3g}" for x in (eta * s).tolist())  # three significant digits
            assert f"  {role:<6} depth {depth}: eta*s = [{shown}]  (mean eta {eta.mean():.3g}, " \
                   f"mean s {s.mean():.3g})" in lines


def test_info_shows_a_hand_made_file(capsys, tmp_path):
    config = LayerwiseConfig(init_lr=0.05, momentum=0.5, per_step=True, depth_bins=2)
    meta = init_meta(config, 10)
    meta["log_scale"][1, 1] = math.log(2.0)
    path = save_optimizer(tmp_path / "o.safetensors", meta, config, load_spec(SINE).to_dict(), {"meta_steps": 0})
    code, out, err = run(capsys, "info", path)
    assert code == 0, err
    assert '"depth_bins": 2' in out and "learned schedules over 10 step(s)" in out
    assert "  matrix depth 0.00: eta*s = [0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, ...]" in out
    assert "  vector depth 1.00: eta*s = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, ...]  (mean eta 0.05, mean s 2)" in out


# --------------------------------------------------------------------------- error paths
def test_spec_file_missing(capsys, tmp_path):
    missing = tmp_path / "missing.toml"
    assert_error(capsys, ["meta-train", "--spec", missing, "--out", tmp_path / "run"], str(missing), "no such spec file")
    assert not (tmp_path / "run").exists()  # nothing written before the spec is validated


def test_malformed_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('description = "x"\n[family\nname = "sine"\n')
    assert_error(capsys, ["meta-train", "--spec", bad, "--out", tmp_path / "run"], "bad.toml", "malformed TOML")
    assert not (tmp_path / "run").exists()


def test_unknown_key(capsys, tmp_path):
    spec = tiny_spec(tmp_path, meta={"learning_rate": 0.1})
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "run"],
                 "[meta]", "unknown key 'learning_rate'",
                 "allowed keys: batch_size, steps, lr, loss_lr, net_lr, clip, task_clip, select_every, "
                 "select_tasks")


@pytest.mark.parametrize("table,key,value,needle", [
    ("inner", "steps", 0, "[inner]: steps = 0 is not allowed; expected an integer in [1, 10000]"),
    ("optimizer", "momentum", 2.0, "[optimizer]: momentum = 2.0 is not allowed; expected a number in [0.0, 0.999]"),
    ("meta", "batch_size", -3, "[meta]: batch_size = -3 is not allowed; expected an integer in [1, 4096]"),
    ("inner", "objective", "median", "objective = 'median' is not allowed; expected one of 'mean'"),
])
def test_out_of_range(capsys, tmp_path, table, key, value, needle):
    spec = tiny_spec(tmp_path, **{table: {key: value}})
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "run"], needle)


def test_unknown_family(capsys, tmp_path):
    spec = tiny_spec(tmp_path, family={"name": "cosine"})
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "run"],
                 "name = 'cosine' is not allowed", "'sine'", "'teacher_mlp'")


def test_evaluate_bad_files(capsys, tmp_path):
    missing = tmp_path / "missing.safetensors"
    assert_error(capsys, ["evaluate", missing, "--spec", SINE, "--quiet"], str(missing), "no such file")
    good = save_optimizer(tmp_path / "good.safetensors", init_meta(LayerwiseConfig(), 20), LayerwiseConfig(),
                          load_spec(SINE).to_dict(), {})
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(good.read_bytes()[:-5])
    assert_error(capsys, ["evaluate", corrupted, "--spec", SINE, "--quiet"], "truncated or corrupted")
    # a good file with a bad spec: the spec error, still before any work
    assert_error(capsys, ["evaluate", good, "--spec", tmp_path / "none.toml", "--quiet"], "no such spec file")


def test_info_on_non_safetensors(capsys):
    assert_error(capsys, ["info", SINE], str(SINE), "not a readable safetensors file")


def test_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert_error(capsys, ["meta-train", "--spec", tiny_spec(tmp_path), "--out", target, "--quiet"],
                 f"--out {target}: exists and is not a folder")
    assert target.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable(capsys, tmp_path):
    assert_error(capsys, ["meta-train", "--spec", tiny_spec(tmp_path), "--out", tmp_path / "run", "--quiet",
                          "--device", "cuda"], "CUDA is not available")
    good = save_optimizer(tmp_path / "good.safetensors", init_meta(LayerwiseConfig(), 3), LayerwiseConfig(),
                          load_spec(SINE).to_dict(), {})
    assert_error(capsys, ["evaluate", good, "--spec", tiny_spec(tmp_path), "--quiet", "--device", "cuda"],
                 "CUDA is not available")


@pytest.mark.parametrize("argv,needle", [
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--meta-steps", "-1"],
     "--meta-steps: expected an integer in [0, 10000000], got -1"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--seed", "x"], "--seed: expected a non-negative integer, got 'x'"),
    (["evaluate", "f.safetensors", "--spec", "s.toml", "--tasks", "0"], "--tasks: expected an integer in [1, 100000], got 0"),
    (["meta-train", "--out", "o"], "the following arguments are required: --spec"),
    (["evaluate", "--spec", "s.toml"], "the following arguments are required: file"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--rule", "adam"], "invalid choice: 'adam'"),
])
def test_argparse_errors(capsys, argv, needle):
    code, out, err = argparse_exit(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("usage: metascale") and needle in err, err


# --------------------------------------------------------------------------- odd input types
# Bad input that once escaped as a Python traceback instead of `metascale: error:` + exit 2.
def test_family_name_not_a_string(capsys, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[family]\nname = ["sine"]\n')
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "run"], "name = ['sine'] is not allowed")


def test_str_list_of_lists(capsys, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[family]\nname = "teacher_mlp"\nactivations = [["relu"]]\n')
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "run"], "activations = [['relu']] is not allowed")


def test_bogus_device(capsys, tmp_path):
    assert_error(capsys, ["meta-train", "--spec", tiny_spec(tmp_path), "--out", tmp_path / "run", "--quiet",
                          "--device", "bogus"], "bogus")


def test_evaluate_json_is_a_folder(capsys, tmp_path):
    spec = tiny_spec(tmp_path)
    opt = save_optimizer(tmp_path / "o.safetensors", init_meta(LayerwiseConfig(), 3), LayerwiseConfig(),
                         load_spec(spec).to_dict(), {})
    (tmp_path / "j").mkdir()
    assert_error(capsys, ["evaluate", opt, "--spec", spec, "--quiet", "--json", tmp_path / "j"], "--json")


# --------------------------------------------------------------------------- checkpoints, resuming, bad files
import shutil  # noqa: E402  (this section's own imports, kept next to it)

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from metascale.export import save_loss  # noqa: E402
from metascale.losses import LossConfig, make_loss  # noqa: E402
from metascale.meta.checkpoint import checkpoint_digest  # noqa: E402


def _edit(path: Path, *, tensors=None, digest: bool = False, **metadata: str) -> Path:
    """Rewrite a safetensors file in place with edited tensors/metadata (a recomputed checkpoint
    digest when ``digest``)."""
    with safe_open(str(path), "pt") as f:
        t, m = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if tensors:
        tensors(t)
    m.update(metadata)
    if digest:
        m["digest"] = checkpoint_digest(t, m)
    save_file(t, str(path), metadata=m)
    return path


def test_resume_refusals(capsys, tmp_path):
    """Every way --resume can be wrong: one line, exit 2, and the run folder left as it was."""
    spec, out = tiny_spec(tmp_path), tmp_path / "run"
    base = ["meta-train", "--spec", spec, "--out", out, "--quiet", "--device", "cpu"]
    code, _, err = run(capsys, *base, "--checkpoint-every", 1)
    assert code == 0, err
    ck, metrics = out / "checkpoint.safetensors", out / "metrics.jsonl"
    before = read_optimizer(out / "optimizer.safetensors").meta
    resume = [*base, "--resume"]
    code, stdout, err = run(capsys, *resume)  # a finished run resumes to the same export
    assert code == 0 and "resumed from the checkpoint at meta-step 2" in stdout, err
    after = read_optimizer(out / "optimizer.safetensors").meta
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "optimizer.safetensors"}

    assert_error(capsys, [*resume, "--seed", 4], str(ck), "from another run: seed differs (checkpoint 0, this run 4)")
    assert_error(capsys, ["meta-train", "--spec", tiny_spec(tmp_path, "other", inner={"steps": 4}), "--out", out,
                          "--quiet", "--device", "cpu", "--resume"], "spec.inner.steps differs (checkpoint 3, this run 4)")
    assert_error(capsys, [*resume, "--engine", "func"], 'spec.inner.engine differs (checkpoint "higher", this run "func")')
    assert_error(capsys, [*resume, "--learn", "both"], 'learn differs (checkpoint "optimizer", this run "both")')
    assert_error(capsys, [*resume, "--meta-steps", 1], "the checkpoint is at meta-step 2, past the 1 meta-steps asked for")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "optimizer.safetensors"} == kept

    good = ck.read_bytes()
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    assert_error(capsys, resume, str(metrics), "holds no record of meta-step 1", "cannot resume")
    metrics.write_bytes(kept["metrics.jsonl"])
    _edit(ck, digest=True, format_version="2")
    assert_error(capsys, resume, str(ck), "file format version '2'; this metascale reads version '1'")
    ck.write_bytes(good)
    _edit(ck, torch_version="1.0")  # any edit without a matching digest
    assert_error(capsys, resume, str(ck), "contents do not match the stored digest (file corrupted or edited)")
    flipped = bytearray(good)
    flipped[-3] ^= 0x10  # a bit in the last tensor's bytes
    ck.write_bytes(bytes(flipped))
    assert_error(capsys, resume, "do not match the stored digest")
    ck.write_bytes(good[: len(good) // 2])
    assert_error(capsys, resume, str(ck), "truncated or corrupted")
    shutil.copy(out / "optimizer.safetensors", ck)
    assert_error(capsys, resume, "not a metascale checkpoint file (format = 'metascale.optimizer')")
    ck.unlink()
    assert_error(capsys, resume, f"--resume: no checkpoint {ck} to resume from")
    assert_error(capsys, ["meta-train", "--spec", spec, "--out", tmp_path / "never", "--quiet", "--resume"],
                 "--resume: no checkpoint")
    assert not (tmp_path / "never").exists()


def test_checkpoint_every_zero_writes_none(capsys, tmp_path):
    code, _, err = run(capsys, "meta-train", "--spec", tiny_spec(tmp_path), "--out", tmp_path / "run", "--quiet",
                       "--device", "cpu", "--checkpoint-every", 0)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "optimizer.safetensors"]


@pytest.mark.parametrize("argv,needle", [
    (["meta-train", "--spec", "s.toml", "--out", "o", "--checkpoint-every", "-1"],
     "--checkpoint-every: expected a non-negative integer, got -1"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--checkpoint-every", "often"],
     "--checkpoint-every: expected a non-negative integer, got 'often'"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--resume", "yes"], "unrecognized arguments: yes"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--learn", "everything"], "invalid choice: 'everything'"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--loss", "hinge"], "invalid choice: 'hinge'"),
    (["meta-train", "--spec", "s.toml", "--out", "o", "--engine", "jax"], "invalid choice: 'jax'"),
    (["meta-train", "--spec", "s.toml"], "the following arguments are required: --out"),
    (["evaluate", "f.safetensors", "--spec", "s.toml", "--steps", "0"], "--steps: expected an integer in [1, 1000000], got 0"),
    (["evaluate", "f.safetensors", "--spec", "s.toml", "--seed", "-2"], "--seed: expected a non-negative integer, got -2"),
    (["info"], "the following arguments are required: file"),
])
def test_more_argparse_errors(capsys, argv, needle):
    code, out, err = argparse_exit(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("usage: metascale") and needle in err, err


def test_spec_files_of_the_wrong_type(capsys, tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert_error(capsys, ["meta-train", "--spec", binary, "--out", tmp_path / "run"], "binary.toml", "malformed TOML")
    assert_error(capsys, ["meta-train", "--spec", tmp_path, "--out", tmp_path / "run"], "no such spec file")
    wrong_type = tiny_spec(tmp_path, meta={"steps": "10"})
    assert_error(capsys, ["meta-train", "--spec", wrong_type, "--out", tmp_path / "run"],
                 "[meta]: steps = '10' is not allowed; expected an integer")
    table = tmp_path / "table.toml"
    table.write_text('inner = 3\n[family]\nname = "sine"\n')
    assert_error(capsys, ["meta-train", "--spec", table, "--out", tmp_path / "run"], "'inner' must be a table")
    assert not (tmp_path / "run").exists()
    assert_error(capsys, ["tasks", "--dir", binary], "no such folder")


def _bad_export(tmp_path: Path, case: str) -> Path:
    path = save_optimizer(tmp_path / f"{case}.safetensors", init_meta(LayerwiseConfig(), 3), LayerwiseConfig(),
                          load_spec(SINE).to_dict(), {"meta_steps": 0})
    edits = {
        "tensor_missing": dict(tensors=lambda t: t.pop("log_scale")),
        "tensor_extra": dict(tensors=lambda t: t.update(momentum=torch.zeros(2, 3, 3))),
        "mis_shaped": dict(tensors=lambda t: t.update(log_scale=torch.zeros(2, 3, 4))),
        "float64": dict(tensors=lambda t: t.update(log_scale=t["log_scale"].double())),
        "nan": dict(tensors=lambda t: t["log_scale"].view(-1).__setitem__(0, math.nan)),
        "version": dict(format_version="3"),
        "not_json": dict(rule_config="{momentum: 0.9"),
        "huge_int": dict(summary="9" * 5000),
        "extra_key": dict(signature="x"),
        "rule": dict(rule="lion"),
        # an unregistered family name loads (tests/test_export.py); a family name that is not a
        # string, or a known family with a bad value, does not
        "spec": dict(spec=json.dumps({**load_spec(SINE).to_dict(), "family": {"name": 7}})),
        "spec_value": dict(spec=json.dumps({**load_spec(SINE).to_dict(),
                                            "family": {"name": "sine", "n_train": "ten"}})),
    }
    return _edit(path, **edits[case])


@pytest.mark.parametrize("case,needle", [
    ("tensor_missing", "expected exactly ['log_step_size', 'log_scale']"),
    ("tensor_extra", "expected exactly ['log_step_size', 'log_scale']"),
    ("mis_shaped", "tensor 'log_scale' has shape (2, 3, 4)"),
    ("float64", "dtype torch.float64; expected float32"),
    ("nan", "non-finite"),
    ("version", "file format version '3'; this metascale reads versions 1, 2"),
    ("not_json", "metadata 'rule_config' is not valid JSON"),
    ("huge_int", "metadata 'summary' is not valid JSON"),
    ("extra_key", "unexpected ['signature']"),
    ("rule", "unknown rule 'lion'"),
    ("spec", "name = 7 is not allowed"),
    ("spec_value", "n_train"),
])
def test_info_and_evaluate_refuse_bad_exports(capsys, tmp_path, case, needle):
    bad = _bad_export(tmp_path, case)
    assert_error(capsys, ["info", bad], str(bad), needle)
    assert_error(capsys, ["evaluate", bad, "--spec", SINE, "--quiet"], str(bad), needle)


def test_bad_loss_files(capsys, tmp_path):
    spec = load_spec(SINE).to_dict()
    loss = save_loss(tmp_path / "loss.safetensors", make_loss("regression", LossConfig()), spec, {})
    good = save_optimizer(tmp_path / "good.safetensors", init_meta(LayerwiseConfig(), 20), LayerwiseConfig(), spec, {})
    first = sorted(make_loss("regression", LossConfig()).state_dict())[0]
    missing = _edit(save_loss(tmp_path / "missing.safetensors", make_loss("regression", LossConfig()), spec, {}),
                    tensors=lambda t: t.pop(first))
    assert_error(capsys, ["evaluate", missing, "--spec", SINE, "--quiet"], str(missing), "expected")
    assert_error(capsys, ["evaluate", good, "--spec", SINE, "--quiet", "--loss", missing], str(missing), "expected")
    kind = _edit(save_loss(tmp_path / "kind.safetensors", make_loss("regression", LossConfig()), spec, {}),
                 task_kind="ranking")
    assert_error(capsys, ["evaluate", kind, "--spec", SINE, "--quiet"], "task_kind 'ranking'")
    assert_error(capsys, ["evaluate", loss, "--spec", SINE, "--quiet", "--loss", loss], "FILE is already a learned loss")
    assert_error(capsys, ["evaluate", good, "--spec", SINE, "--quiet", "--loss", tmp_path / "none.safetensors"],
                 "no such file")
    assert_error(capsys, ["info", loss], str(loss), "not a metascale optimizer file (format = 'metascale.loss')")


def test_a_checkpoint_is_not_an_exported_optimizer(capsys, tmp_path):
    code, _, err = run(capsys, "meta-train", "--spec", tiny_spec(tmp_path), "--out", tmp_path / "run", "--quiet",
                       "--device", "cpu")
    assert code == 0, err
    ck = tmp_path / "run" / "checkpoint.safetensors"
    assert ck.is_file()  # the default cadence saves the last meta-step
    assert_error(capsys, ["info", ck], "not a metascale optimizer file (format = 'metascale.checkpoint')")
    assert_error(capsys, ["evaluate", ck, "--spec", SINE, "--quiet"], "not a metascale optimizer file")
    assert_error(capsys, ["info", tmp_path], "no such file")


def test_a_closed_pipe_is_not_an_error(capsys, monkeypatch):
    """`metascale tasks | head -1`: the reader leaving is not reported as an error."""
    import argparse
    import io

    from metascale.cli import _run

    def write_to_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert _run(argparse.Namespace(func=write_to_closed_pipe)) == 0
    assert capsys.readouterr().err == ""
