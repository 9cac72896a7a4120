"""``metascale report``: a tiny meta-train + evaluate run through the CLI, then the plots and
report.md it writes, the schedules it measures (equal to the learned ones), the missing
``eval.json`` path, a loss-only run, and the error paths (exit code 2, one line)."""
from __future__ import annotations

import json
import shlex
import shutil
import struct
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from metascale.cli import main
from metascale.export import read_optimizer
from metascale.optim.groups import GroupInfo
from metascale.optim.layerwise import group_schedules
from metascale.report import IMAGES, spec_toml, trace_schedules
from metascale.spec import load_spec

REPO = Path(__file__).parent.parent
OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "learned")


def tiny_spec(folder: Path, name: str = "tiny") -> Path:
    """tasks/sine.toml with tiny budgets (2 meta-steps of 2 tasks, K = 4, 3 held-out tasks)."""
    data = tomllib.loads((REPO / "tasks" / "sine.toml").read_text(encoding="utf-8"))
    data["meta"].update(steps=2, batch_size=2)
    data["inner"].update(steps=4)
    data["evaluate"].update(tasks=3, tune_tasks=2, points_per_decade=1)
    path = folder / f"{name}.toml"
    path.write_text(spec_toml(data), encoding="utf-8")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(spec, run folder)`` of a tiny run with ``eval.json``; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("report")
    spec = tiny_spec(root)
    folder = root / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["meta-train", "--spec", str(spec), "--out", str(folder), "--quiet", "--seed", "3"]) == 0
        assert main(["evaluate", str(folder / "optimizer.safetensors"), "--spec", str(spec), "--json",
                     str(folder / "eval.json"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(n)
    return spec, folder


def copy_run(src: Path, dst: Path, *skip: str) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip and f.suffix in (".jsonl", ".safetensors", ".json"):
            shutil.copy(f, dst / f.name)
    return dst


def png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of a PNG file; fails unless it has the PNG signature and an IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR", path
    assert data[-8:-4] == b"IEND", path  # written to the end
    return struct.unpack(">II", data[16:24])


def assert_plot(path: Path, min_width: int = 1000, min_height: int = 400) -> None:
    w, h = png_size(path)
    assert w >= min_width and h >= min_height, (path, w, h)
    assert path.stat().st_size > 30_000, (path, path.stat().st_size)  # lines, labels, legend: not an empty canvas


# --------------------------------------------------------------------------- the report
def test_report_writes_plots_and_markdown(capsys, evaluated_run, tmp_path):
    spec_path, src = evaluated_run
    folder = copy_run(src, tmp_path / "run")
    code, out, err = run(capsys, "report", folder, "--quiet")
    assert code == 0, err
    assert err == ""  # --quiet: no progress bar
    md = folder / "report.md"
    assert out == f"wrote {md} with meta_loss.png, schedules.png, heldout.png\n"
    for name in IMAGES.values():
        assert_plot(folder / name)
    assert png_size(folder / "heldout.png")[1] >= 800  # overview row + one panel per baseline
    text = md.read_text(encoding="utf-8")
    for key, name in IMAGES.items():
        assert f"]({name})" in text, key
    assert "Missing pieces" not in text and "Not evaluated yet" not in text
    assert "| meta-steps | 2 (2 records in metrics.jsonl) |" in text
    # select_every = 10 > 2 meta-steps: the last meta-parameters were measured after the loop
    assert "| exported meta-parameters | after meta-step 2 (lowest selection measure, " in text
    assert "| seed | 3 |" in text and "| skipped tasks | 0 |" in text
    result = json.loads((folder / "eval.json").read_text())
    for name in OPTIMIZERS:
        row = result["optimizers"][name]
        assert f"| {name} | " in text
        assert f" | {row['median_final_loss']:.5g} | {row['iqr_final_loss']:.4g} (" in text, name
        # evaluate stores the quartile curves the band is drawn from
        assert len(row["q25_curve"]) == len(row["q75_curve"]) == len(row["median_curve"]) == 5
        assert all(a <= m <= b for a, m, b in zip(row["q25_curve"], row["median_curve"], row["q75_curve"]))
    assert "## How to read this" in text
    # six groups (3 layers x matrix/vector) in the schedule table
    assert sum(line.startswith(("| 0 | ", "| 1 | ", "| 2 | ")) for line in text.splitlines()) == 6
    # the spec written next to the report is the stored spec, readable by load_spec
    stored = read_optimizer(folder / "optimizer.safetensors").spec
    assert load_spec(folder / "tiny.toml").to_dict() == stored == load_spec(spec_path).to_dict()


def test_report_progress_bar_and_out_folder(capsys, evaluated_run, tmp_path):
    _, folder = evaluated_run
    out_dir = tmp_path / "elsewhere" / "report"
    code, out, err = run(capsys, "report", folder, "--out", out_dir)
    assert code == 0, err
    assert "report" in err and "4/4" in err  # the progress bar, on stderr
    assert f"wrote {out_dir / 'report.md'}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*IMAGES.values(), "report.md", "tiny.toml"])
    assert not (folder / "report.md").exists()  # nothing written into the run folder


def test_schedules_are_the_learned_ones(evaluated_run):
    """The traced step sizes and scales are exactly the exported schedules of each group,
    held at the last value past the horizon."""
    _, folder = evaluated_run
    exp = read_optimizer(folder / "optimizer.safetensors")
    meta = {k: v.double() for k, v in exp.meta.items()}
    trace = trace_schedules(folder / "optimizer.safetensors", exp.spec, steps=exp.horizon + 3, seed=3)
    assert trace.groups == [(0, "matrix"), (0, "vector"), (1, "matrix"), (1, "vector"), (2, "matrix"), (2, "vector")]
    assert trace.step_size.shape == trace.scale.shape == (exp.horizon + 3, 6)
    assert trace.num_layers == 3 and trace.task["split"] == "test" and trace.task["seed"] == 3
    for k, (layer, role) in enumerate(trace.groups):
        eta, s = group_schedules(meta, GroupInfo(role, layer, 3))
        held = lambda x: np.concatenate([x.numpy(), np.full(3, x[-1].item())])  # noqa: E731
        np.testing.assert_allclose(trace.step_size[:, k], held(eta), rtol=1e-12, atol=0)
        np.testing.assert_allclose(trace.scale[:, k], held(s), rtol=1e-12, atol=0)
    assert np.ptp(trace.step_size[: exp.horizon], axis=0).max() > 0  # meta-training moved them apart


def test_missing_eval_json_says_how_to_make_it(capsys, evaluated_run, tmp_path):
    _, src = evaluated_run
    folder = copy_run(src, tmp_path / "run", "eval.json")
    code, out, err = run(capsys, "report", folder, "--quiet")
    assert code == 0, err
    assert f"note: no eval.json in {folder}" in out
    assert not (folder / "heldout.png").exists()
    text = (folder / "report.md").read_text(encoding="utf-8")
    command = (f"metascale evaluate {folder / 'optimizer.safetensors'} --spec {folder / 'tiny.toml'} "
               f"--json {folder / 'eval.json'}")
    assert "**Not evaluated yet**" in text and f"```bash\n{command}\n```" in text and "Missing pieces" in text
    # the command it suggests works, and the next report has the comparison
    code, _, err = run(capsys, *shlex.split(command)[1:], "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "report", folder, "--quiet")
    assert code == 0 and "note:" not in out, (out, err)
    assert_plot(folder / "heldout.png")
    assert "![held-out comparison](heldout.png)" in (folder / "report.md").read_text(encoding="utf-8")


def test_metrics_only_run_with_skipped_tasks(capsys, tmp_path):
    """An interrupted run (metrics, no export) with skipped tasks: the meta-loss plot and a
    summary from the metrics, and notes saying what is missing."""
    folder = tmp_path / "run"
    folder.mkdir()
    recs = [{"meta_step": i, "meta_loss": None if i == 4 else 1.0 / (i + 1), "meta_grad_norm": None if i == 4 else 0.5,
             "tasks_ok": 0 if i == 4 else 8, "skipped_total": 0 if i < 4 else 8 + (i >= 7), "elapsed_s": 0.1 * (i + 1)}
            for i in range(12)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, out, err = run(capsys, "report", folder, "--quiet")
    assert code == 0, err
    assert_plot(folder / "meta_loss.png")
    assert not (folder / "schedules.png").exists() and not (folder / "heldout.png").exists()
    text = (folder / "report.md").read_text(encoding="utf-8")
    assert "| skipped tasks | 9 |" in text and "| wall time | 1.2 s (from metrics.jsonl) |" in text
    assert "no optimizer.safetensors or loss.safetensors" in text and "**Not evaluated**: there is no exported" in text
    assert "| meta-loss (mean of the first / last 10% of meta-steps) | 1 -> 0.08333 (1 meta-step each) |" in text
    assert out.count("note: ") == 1


def test_loss_only_run(capsys, tmp_path):
    """``--learn loss`` writes no optimizer: the report says so and suggests evaluating the loss."""
    folder = tmp_path / "run"
    spec = tiny_spec(tmp_path)
    code, _, err = run(capsys, "meta-train", "--spec", spec, "--out", folder, "--learn", "loss", "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "report", folder, "--quiet")
    assert code == 0, err
    assert "this run learned a loss only" in out
    text = (folder / "report.md").read_text(encoding="utf-8")
    assert "| learned | loss |" in text and "| inner SGD step size (learned loss) |" in text
    assert f"metascale evaluate {folder / 'loss.safetensors'} --spec {folder / 'tiny.toml'}" in text
    assert_plot(folder / "meta_loss.png")
    assert not (folder / "schedules.png").exists()


def test_tasks_drawn_outside_metascale(capsys, evaluated_run, tmp_path):
    """A run on external tasks (metascale.interop): no held-out task to trace the schedules on
    and no TOML spec to evaluate with; the report says so instead of failing."""
    from metascale.export import save_optimizer
    _, src = evaluated_run
    exp = read_optimizer(src / "optimizer.safetensors")
    folder = copy_run(src, tmp_path / "run", "eval.json", "optimizer.safetensors")
    spec = dict(exp.spec, family={"name": "external", "source": "learn2learn", "support": None})
    save_optimizer(folder / "optimizer.safetensors", exp.meta, exp.config, spec, exp.summary)
    code, out, err = run(capsys, "report", folder, "--quiet")
    assert code == 0, err
    assert "drawn outside metascale (source learn2learn)" in out and "metascale.evaluate.evaluate" in out
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".toml", ".md")) == \
        ["meta_loss.png", "report.md"]
    text = (folder / "report.md").read_text(encoding="utf-8")
    assert '"source": "learn2learn"' in text and "metascale evaluate" not in text


# --------------------------------------------------------------------------- errors
def assert_error(capsys, argv, *needles: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("metascale: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_report_errors(capsys, evaluated_run, tmp_path):
    _, src = evaluated_run
    assert_error(capsys, ["report", tmp_path / "nope", "--quiet"], "nope: no such run folder")
    (tmp_path / "file").write_text("x")
    assert_error(capsys, ["report", tmp_path / "file", "--quiet"], "is not a folder")
    (tmp_path / "empty").mkdir()
    assert_error(capsys, ["report", tmp_path / "empty", "--quiet"], "metrics.jsonl: no such file", "meta-train --out")

    def broken(name: str, **files: str | bytes) -> Path:
        folder = copy_run(src, tmp_path / name)
        for fname, content in files.items():
            path = folder / fname.replace("_", ".", 1)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        return folder

    assert_error(capsys, ["report", broken("m0", metrics_jsonl=""), "--quiet"], "holds no metrics records")
    good = (src / "metrics.jsonl").read_text().splitlines()
    assert_error(capsys, ["report", broken("m1", metrics_jsonl=good[0] + "\n" + good[1][:50] + "\n"), "--quiet"],
                 "line 2 is not valid JSON")
    assert_error(capsys, ["report", broken("m2", metrics_jsonl='{"meta_loss": 1.0}\n'), "--quiet"],
                 "line 1 is not a metrics record")
    blob = (src / "optimizer.safetensors").read_bytes()
    assert_error(capsys, ["report", broken("o1", optimizer_safetensors=blob[:40]), "--quiet"],
                 "optimizer.safetensors: not a readable safetensors file")
    assert_error(capsys, ["report", broken("e1", eval_json="{not json"), "--quiet"], "eval.json: not readable JSON")
    assert_error(capsys, ["report", broken("e2", eval_json='{"optimizers": {}}'), "--quiet"],
                 "eval.json: not the output of `metascale evaluate --json`")
    assert_error(capsys, ["report", src, "--out", tmp_path / "file", "--quiet"], "exists and is not a folder")


def test_missing_matplotlib_names_the_extra(capsys, evaluated_run, tmp_path, monkeypatch):
    _, src = evaluated_run
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    out_dir = tmp_path / "out"
    assert_error(capsys, ["report", src, "--out", out_dir, "--quiet"], "needs matplotlib",
                 "pip install -e '.[report]' in the metascale repository")
    assert not out_dir.exists()  # failed before writing anything
