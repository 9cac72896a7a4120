r"""Resumable meta-training: one ``.safetensors`` checkpoint, written atomically, no pickle.

:meth:`MetaTrainer.train(..., checkpoint_path=P, checkpoint_every=N)
<metascale.meta.MetaTrainer.train>` writes ``P`` after every ``N``-th meta-step and after the
last one; ``train(..., resume=True)`` (``metascale meta-train --resume``) continues from it.
On CPU the resumed run ends with bit-for-bit the meta-parameters of a run that was never
interrupted, and the same ``metrics.jsonl`` except the wall-clock field ``elapsed_s``.

**Writing.** The file is serialised in memory, written to a temporary file in the same folder,
``fsync``-ed and moved over the previous checkpoint with ``os.replace`` (atomic on POSIX and
Windows); then the folder is ``fsync``-ed. A process killed at any instant leaves the previous
checkpoint or the new one, never a mix. Leftover temporary files
(``checkpoint.safetensors.*.tmp``) are ignored, and removed by the next write. The metrics file
is flushed and ``fsync``-ed before each checkpoint, so it holds every record the checkpoint has
seen; on resume the records from the checkpoint's meta-step on are cut off and rewritten.

**Tensors** (named ``prefix.key``):

==========================  ==============================================================
``meta.<name>``             the meta-parameters (the rule's own; opaque to this module)
``loss.<name>``             the learned loss network's ``state_dict`` (only when learned)
``adam.<param>.<key>``      Adam's state of parameter ``<param>`` (``meta.<name>`` or
                            ``loss.<name>``): ``step`` (float32 scalar), ``exp_avg``,
                            ``exp_avg_sq``; absent before Adam's first step
``history``                 float64 ``(step,)``: the mean meta-loss of each meta-step done,
                            NaN where every task of the meta-step was skipped
``best.<name>``             the best meta-parameters so far by the selection measure
                            (``[meta] select_every``; only when selecting)
``rng.torch``               ``torch.get_rng_state()`` (uint8)
``rng.cuda.<d>``            ``torch.cuda.get_rng_state_all()[d]``, when training on CUDA
==========================  ==============================================================

**Metadata** (string -> string, JSON values):

====================  ===================================================================
``format``            ``"metascale.checkpoint"``
``format_version``    ``"1"``
``run``               what a resume must match (:func:`run_identity`): ``spec`` (dict;
                      its ``name`` and ``description`` are not compared), ``seed``,
                      ``learn``, ``rule`` and ``rule_config``, ``loss_config`` (or null),
                      ``inner_lr`` (or null)
``progress``          ``step`` (meta-steps done), ``skipped`` (tasks skipped so far),
                      ``elapsed_s`` (wall time so far), ``device``; when selecting,
                      ``best_step`` and ``best_loss`` of the ``best.*`` tensors
``torch_version``     the writer's torch version (informational)
``digest``            SHA-256 over every other metadata entry and every tensor's name,
                      dtype, shape and bytes (:func:`checkpoint_digest`)
====================  ===================================================================

The digest makes a resume either continue exactly the saved state or refuse: a flipped bit
anywhere in the file is a :class:`~metascale.errors.CheckpointError`, never a silently
different run. Reading validates everything else as well: first, from the header alone, the run
identity and every tensor's name, dtype and shape against what it implies (the rule's
meta-parameter shapes at the stored spec's horizon, the loss network's, ``history`` of the
meta-step count), so a file that declares a huge tensor is refused before any is read; then the
digest (hashed in place, no copy of the tensors), finiteness and the counters' consistency with
each other and with the stored spec.

**Random state.** Meta-training draws every task, minibatch and model init from explicit
generators seeded by ``(seed, split, draw)``, so no generator state has to carry over for an
exact resume. The global torch generators (CPU; CUDA when training on it) are saved and
restored all the same, for task families that use them. NumPy's and Python's ``random`` are
used nowhere in meta-training and are not saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save as serialise

from ..config import to_dict
from ..errors import CheckpointError, ExportFormatError, SpecError
from ..config import from_table
from ..losses import LossConfig, make_loss
from ..optim import RULES, rule_for
from ..safeio import clip_text, read_safetensors

FORMAT = "metascale.checkpoint"
FORMAT_VERSION = "1"
_KEYS = ("format", "format_version", "run", "progress", "torch_version", "digest")
_RUN_KEYS = ("spec", "seed", "learn", "rule", "rule_config", "loss_config", "inner_lr")
_PROGRESS_KEYS = ("step", "skipped", "elapsed_s", "device")
_BEST_KEYS = ("best_step", "best_loss")  # progress keys present only when selecting
_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
_COSMETIC = ("name", "description")  # spec entries a resume need not match
_LEARN = ("optimizer", "loss", "both")


@dataclasses.dataclass
class Checkpoint:
    """The validated content of a checkpoint (tensors on CPU).

    Attributes:
        run: what a resume must match (:func:`run_identity`).
        step: meta-steps done; a resume continues with meta-step ``step``.
        skipped: tasks skipped (non-finite meta-loss or meta-gradient) so far.
        history: mean meta-loss of each meta-step done (``None``: every task skipped).
        elapsed_s: wall time of the run so far.
        device: the device it ran on (informational).
        meta: the meta-parameters.
        loss: the learned loss network's ``state_dict`` (empty unless learned).
        adam: Adam's state per parameter name (``"meta.<name>"``/``"loss.<name>"``).
        rng: ``"torch"`` and ``"cuda.<d>"`` generator states.
        best: ``(meta-step, selection loss, meta-parameters)`` of the best selection measure
            so far (``[meta] select_every``), else ``None``.
    """

    run: dict
    step: int
    skipped: int
    history: list[float | None]
    elapsed_s: float
    device: str
    meta: dict[str, torch.Tensor]
    loss: dict[str, torch.Tensor]
    adam: dict[str, dict[str, torch.Tensor]]
    rng: dict[str, torch.Tensor]
    best: tuple[int, float, dict[str, torch.Tensor]] | None = None


# --------------------------------------------------------------------------- capture / restore
def run_identity(spec: dict, seed: int, learn: str, rule: Any, loss_config: Any, inner_lr: float | None) -> dict:
    """The JSON-able identity of a run: a checkpoint resumes only a run with an equal identity.

    ``rule`` is the (resolved) config of the rule the inner loop runs (its registry name and
    fields are recorded); ``loss_config`` the learned loss's config, ``None`` when no loss is
    learned.
    """
    ident = {"spec": spec, "seed": int(seed), "learn": learn,
             "rule": rule_for(rule).name, "rule_config": to_dict(rule),
             "loss_config": None if loss_config is None else to_dict(loss_config), "inner_lr": inner_lr}
    return json.loads(json.dumps(ident))  # tuples -> lists, as they come back from the file


def _param_names(adam: torch.optim.Optimizer, meta: dict[str, torch.Tensor],
                 loss_fn: torch.nn.Module | None) -> list[str]:
    """Checkpoint names of Adam's parameters, in Adam's (state index) order."""
    names = {id(v): f"meta.{k}" for k, v in meta.items()}
    if loss_fn is not None:
        names.update({id(p): f"loss.{k}" for k, p in loss_fn.named_parameters()})
    return [names[id(p)] for g in adam.param_groups for p in g["params"]]


def rng_state(device: torch.device | str) -> dict[str, torch.Tensor]:
    """The global generator states that matter on ``device``."""
    rng = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        rng.update({f"cuda.{d}": s for d, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def snapshot(run: dict, step: int, skipped: int, history: list[float | None], elapsed_s: float,
             meta: dict[str, torch.Tensor], loss_fn: torch.nn.Module | None, adam: torch.optim.Optimizer,
             device: torch.device | str, best: tuple[int, float, dict] | None = None) -> Checkpoint:
    """A :class:`Checkpoint` of the trainer's state after ``step`` meta-steps (CPU copies);
    ``best`` is the trainer's ``(meta-step, selection loss, meta-parameters)``."""
    def cpu(t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t).detach().to("cpu", copy=True)
    names = _param_names(adam, meta, loss_fn)
    state = adam.state_dict()["state"]
    return Checkpoint(run=run, step=int(step), skipped=int(skipped), history=list(history),
                      elapsed_s=float(elapsed_s), device=str(device),
                      meta={k: cpu(v) for k, v in meta.items()},
                      loss={} if loss_fn is None else {k: cpu(v) for k, v in loss_fn.state_dict().items()},
                      adam={names[i]: {k: cpu(v) for k, v in s.items()} for i, s in state.items()},
                      rng=rng_state(device),
                      best=None if best is None else (int(best[0]), float(best[1]),
                                                       {k: cpu(v) for k, v in best[2].items()}))


def _show(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _difference(a: Any, b: Any, where: str) -> str | None:
    """The path of the first difference between JSON values ``a`` and ``b``, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if where == "run.spec" and k in _COSMETIC:
                continue
            if k not in a or k not in b:
                return f"{where}.{k} is {'missing from the checkpoint' if k not in a else 'not in this run'}"
            found = _difference(a[k], b[k], f"{where}.{k}")
            if found:
                return found
        return None
    if a != b or type(a) is not type(b):
        return f"{where} differs (checkpoint {_show(a)}, this run {_show(b)})"
    return None


def restore(path: str | Path, run: dict, meta: dict[str, torch.Tensor], loss_fn: torch.nn.Module | None,
            adam: torch.optim.Optimizer, total_steps: int) -> Checkpoint:
    """Read the checkpoint at ``path``, check that it belongs to ``run`` and fits the trainer's
    meta-parameters, loss network and Adam, then load it into them (in place) and into the
    global generators. Returns the checkpoint (for its counters and history). The stored spec
    and configs are compared in canonical form, so a config field that a later metascale added
    compares at its default.

    Raises:
        CheckpointError: no such file, a corrupted file, another format version, another run,
            or a checkpoint past ``total_steps``.
    """
    ck = read_checkpoint(path)
    path = Path(path)
    found = _difference(ck.run, json.loads(json.dumps(run)), "run")
    if found:
        raise CheckpointError(f"{path}: the checkpoint is from another run: {found.removeprefix('run.')}; "
                              "delete it (or write to another folder) to start afresh")
    if ck.step > total_steps:
        raise CheckpointError(f"{path}: the checkpoint is at meta-step {ck.step}, past the {total_steps} meta-steps "
                              "asked for")
    expected = {"meta": {k: v for k, v in meta.items()},
                "loss": {} if loss_fn is None else dict(loss_fn.state_dict())}
    for group, have in (("meta", ck.meta), ("loss", ck.loss)):
        want = expected[group]
        if sorted(have) != sorted(want) or any(have[k].shape != want[k].shape or have[k].dtype != want[k].dtype
                                               for k in want):
            raise CheckpointError(f"{path}: {group} tensors {_layout(have)} do not fit this run's {_layout(want)}")
    names = _param_names(adam, meta, loss_fn)
    if ck.adam and sorted(ck.adam) != sorted(names):
        raise CheckpointError(f"{path}: Adam state for {sorted(ck.adam)}; this run optimises {sorted(names)}")
    with torch.no_grad():
        for k, v in meta.items():
            v.copy_(ck.meta[k])
        if loss_fn is not None:
            loss_fn.load_state_dict(ck.loss)
    state = adam.state_dict()
    state["state"] = {i: {k: v.clone() for k, v in ck.adam[n].items()} for i, n in enumerate(names) if n in ck.adam}
    adam.load_state_dict(state)
    torch.set_rng_state(ck.rng["torch"])
    cuda = sorted(k for k in ck.rng if k.startswith("cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        try:
            for k in cuda:
                torch.cuda.set_rng_state(ck.rng[k], int(k.split(".")[1]))
        except RuntimeError as e:
            raise CheckpointError(f"{path}: CUDA generator state not accepted: {e}") from None
    return ck


def _layout(tensors: dict[str, torch.Tensor]) -> str:
    return "{" + ", ".join(f"{k}: {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                           for k, t in sorted(tensors.items())) + "}"


# --------------------------------------------------------------------------- the file
def checkpoint_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 (hex) over every metadata entry but ``digest`` and every tensor's name, dtype,
    shape and bytes, each length-prefixed, in sorted order."""
    h = hashlib.sha256()

    def put(b) -> None:  # bytes, or a uint8 array hashed in place (no copy of a tensor's bytes)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    for k in sorted(metadata):
        if k != "digest":
            put(json.dumps([k, metadata[k]]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        put(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        put(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _tensors(ck: Checkpoint) -> dict[str, torch.Tensor]:
    out = {f"meta.{k}": v for k, v in ck.meta.items()}
    out.update({f"loss.{k}": v for k, v in ck.loss.items()})
    out.update({f"adam.{p}.{k}": v for p, s in ck.adam.items() for k, v in s.items()})
    out["history"] = torch.tensor([math.nan if h is None else h for h in ck.history], dtype=torch.float64)
    out.update({f"rng.{k}": v for k, v in ck.rng.items()})
    if ck.best is not None:
        out.update({f"best.{k}": v for k, v in ck.best[2].items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_checkpoint(path: str | Path, ck: Checkpoint, *, metrics: IO | None = None) -> Path:
    """Write ``ck`` to ``path`` atomically (temporary file in the same folder, ``fsync``,
    ``os.replace``, ``fsync`` of the folder). ``metrics``, an open metrics file, is flushed and
    ``fsync``-ed first, so that it never lags behind the checkpoint."""
    path = Path(path)
    tensors = _tensors(ck)
    progress = {"step": ck.step, "skipped": ck.skipped, "elapsed_s": round(ck.elapsed_s, 3), "device": ck.device}
    if ck.best is not None:
        progress.update(best_step=ck.best[0], best_loss=ck.best[1])
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "run": json.dumps(ck.run),
                "progress": json.dumps(progress),
                "torch_version": torch.__version__}
    metadata["digest"] = checkpoint_digest(tensors, metadata)
    data = serialise(tensors, metadata)
    if metrics is not None:
        metrics.flush()
        os.fsync(metrics.fileno())
    _write_atomic(path, data)
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}.*.tmp"):  # left by a process killed mid-write
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not possible on every OS
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _json_object(meta: dict[str, str], key: str, path: Path) -> dict:
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError):  # JSONDecodeError, over-long integers, deep nesting
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata {key!r} must be a JSON object")
    return value


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MAX_META_STEPS = 10_000_000
"""The largest meta-step count a checkpoint may hold (the spec's ``[meta] steps`` cap)."""
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _identity_of(meta_str: dict[str, str], path: Path) -> tuple[dict, dict, Any, dict]:
    """``(run, progress, spec, layout)`` from the metadata alone, validated; ``layout``: the
    shapes of the meta-parameters and of the loss network (one per task kind) the run implies,
    what the tensors' declared shapes are checked against before any is read."""
    missing, extra = [k for k in _KEYS if k not in meta_str], sorted(k for k in meta_str if k not in _KEYS)
    if missing or extra:
        raise CheckpointError(clip_text(f"{path}: metadata keys {'missing ' + str(missing) if missing else ''}"
                                        f"{' unexpected ' + str(extra) if extra else ''}", 300))
    run, progress = _json_object(meta_str, "run", path), _json_object(meta_str, "progress", path)
    if sorted(run) != sorted(_RUN_KEYS):
        raise CheckpointError(clip_text(f"{path}: metadata 'run' has keys {sorted(run)}; expected "
                                        f"{sorted(_RUN_KEYS)}", 300))
    if sorted(progress) not in (sorted(_PROGRESS_KEYS), sorted(_PROGRESS_KEYS + _BEST_KEYS)):
        raise CheckpointError(clip_text(f"{path}: metadata 'progress' has keys {sorted(progress)}; expected "
                                        f"{sorted(_PROGRESS_KEYS)} (and {list(_BEST_KEYS)} when selecting)", 300))
    step, skipped, elapsed = progress["step"], progress["skipped"], progress["elapsed_s"]
    if not (_is_int(step) and step <= MAX_META_STEPS and _is_int(skipped) and _is_num(elapsed) and elapsed >= 0
            and isinstance(progress["device"], str)):
        raise CheckpointError(f"{path}: progress {_show(progress)} is not valid")
    from ..spec import spec_from_dict  # local: the spec module imports the whole pipeline
    try:
        spec = spec_from_dict(run["spec"], "spec", f"{path}: stored spec")
    except SpecError as e:
        raise CheckpointError(clip_text(f"invalid {e}", 300)) from None
    learn = run["learn"]
    if not (_is_int(run["seed"]) and learn in _LEARN and isinstance(run["rule"], str)
            and isinstance(run["rule_config"], dict)
            and (run["loss_config"] is None) == (learn == "optimizer")
            and (run["loss_config"] is None or isinstance(run["loss_config"], dict))
            and (run["inner_lr"] is None or (_is_num(run["inner_lr"]) and run["inner_lr"] > 0))):
        raise CheckpointError(f"{path}: run {_show({k: v for k, v in run.items() if k != 'spec'})} is not valid")
    if run["rule"] not in RULES:
        raise CheckpointError(f"{path}: run rule {_show(run['rule'])} is not one of {', '.join(RULES)}")
    rule = RULES[run["rule"]]
    try:
        config = from_table(rule.config_type, run["rule_config"], "run.rule_config")
        loss_config = None if run["loss_config"] is None else from_table(LossConfig, run["loss_config"],
                                                                        "run.loss_config")
    except SpecError as e:
        raise CheckpointError(clip_text(f"{path}: invalid {e}", 300)) from None
    if not rule.owns(config) or rule.resolve(config, spec.inner.horizon) != config:
        raise CheckpointError(f"{path}: run rule_config does not fit rule {rule.name!r} at horizon "
                              f"{spec.inner.horizon}")
    # canonical: a config field added since the checkpoint was written compares at its default
    # (the value the run had), so an upgrade does not refuse runs in flight
    canon = lambda d: json.loads(json.dumps(d))
    run = {**run, "spec": {**canon(spec.to_dict()), **{k: run["spec"][k] for k in _COSMETIC if k in run["spec"]}},
           "rule_config": canon(to_dict(config)),
           "loss_config": None if loss_config is None else canon(to_dict(loss_config))}
    meta = {f"meta.{k}": tuple(v) for k, v in rule.meta_shapes(config, spec.inner.horizon).items()}
    losses = [{}] if loss_config is None else [
        {f"loss.{k}": tuple(v.shape) for k, v in make_loss(kind, loss_config).state_dict().items()}
        for kind in ("regression", "classification")]
    return run, progress, spec, {"meta": meta, "loss": losses}


def _check_layout(declared: dict, run: dict, progress: dict, spec: Any, layout: dict, path: Path) -> None:
    """Every declared tensor's name, dtype and shape against what the metadata implies."""
    meta = layout["meta"]
    names = {n for n in declared if n.startswith("loss.")}
    loss = next((lay for lay in layout["loss"] if set(lay) == names), None)
    if loss is None or set(meta) - set(declared):
        raise CheckpointError(f"{path}: tensors do not fit learn = {run['learn']!r} and rule {run['rule']!r} "
                              f"(meta {clip_text(sorted(n for n in declared if n.startswith('meta.')), 80)}, "
                              f"loss {clip_text(sorted(names), 80)})")
    params = {**meta, **loss}
    for name, (dtype, shape) in declared.items():
        prefix, _, key = name.partition(".")
        if name == "history":
            ok, dtypes = shape == (progress["step"],), (torch.float64,)
        elif prefix == "rng":
            ok = (key == "torch" and shape == tuple(torch.get_rng_state().shape)) \
                or (bool(re.fullmatch(r"cuda\.(0|[1-9][0-9]{0,3})", key)) and len(shape) == 1 and shape[0] <= 1024)
            dtypes = (torch.uint8,)
        elif prefix in ("meta", "loss"):
            ok, dtypes = params.get(name) == shape, _FLOATS
        elif prefix == "best":
            ok, dtypes = meta.get(f"meta.{key}") == shape, _FLOATS
        elif prefix == "adam":
            param, _, part = key.rpartition(".")
            ok = param in params and part in _ADAM_KEYS and shape == (() if part == "step" else params[param])
            dtypes = _FLOATS
        else:
            raise CheckpointError(f"{path}: unexpected tensor {clip_text(repr(name), 80)}")
        if not ok:
            raise CheckpointError(f"{path}: tensor {clip_text(repr(name), 80)} declares shape "
                                  f"{clip_text(shape, 60)}, which its run ({run['rule']}, horizon "
                                  f"{spec.inner.horizon}, {progress['step']} meta-steps) does not imply")
        if dtype not in dtypes:
            raise CheckpointError(f"{path}: tensor {clip_text(repr(name), 80)} has dtype {dtype}; expected "
                                  f"{' or '.join(str(d) for d in dtypes)}")
    if "history" not in declared:
        raise CheckpointError(f"{path}: tensor 'history' missing")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint (see the module docstring for its content).

    Raises:
        CheckpointError: for anything but an intact checkpoint of this format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from (no such file)")
    found: dict[str, Any] = {}

    def check(meta_str: dict[str, str], declared: dict) -> None:  # the header, before any tensor is read
        found["head"] = _identity_of(meta_str, path)
        _check_layout(declared, *found["head"], path)

    try:
        meta_str, tensors = read_safetensors(path, FORMAT, FORMAT_VERSION, check=check)
    except ExportFormatError as e:
        raise CheckpointError(str(e)) from None
    run, progress, spec, _ = found["head"]
    step, skipped, elapsed = progress["step"], progress["skipped"], progress["elapsed_s"]
    learn = run["learn"]
    groups: dict[str, dict[str, torch.Tensor]] = {"meta": {}, "loss": {}, "adam": {}, "rng": {}, "best": {}}
    for name, t in tensors.items():
        prefix, _, key = name.partition(".")
        if name != "history":
            groups[prefix][key] = t
    if checkpoint_digest(tensors, meta_str) != meta_str["digest"]:
        raise CheckpointError(f"{path}: contents do not match the stored digest (file corrupted or edited)")

    # the digest matched: what follows catches files written by another program, not corruption
    history_t = tensors["history"]
    if history_t.shape != (step,) or torch.isinf(history_t).any():
        raise CheckpointError(f"{path}: history has shape {tuple(history_t.shape)} or infinite values; expected "
                              f"({step},) finite or NaN")
    history = [None if math.isnan(h) else h for h in history_t.tolist()]
    empty = history.count(None)
    batch = spec.meta.batch_size
    if not empty * batch <= skipped <= step * batch:
        raise CheckpointError(f"{path}: {skipped} skipped tasks do not fit {step} meta-steps of {batch} tasks "
                              f"with {empty} fully skipped")
    if not groups["meta"] or bool(groups["loss"]) != (learn != "optimizer"):
        raise CheckpointError(f"{path}: tensors do not fit learn = {learn!r} (meta {sorted(groups['meta'])}, "
                              f"loss {sorted(groups['loss'])})")
    best = None
    if "best_step" in progress or groups["best"]:
        b_step, b_loss = progress.get("best_step"), progress.get("best_loss")
        if not (_is_int(b_step, 1) and b_step <= step and _is_num(b_loss)) \
                or sorted(groups["best"]) != sorted(groups["meta"]) \
                or any(groups["best"][k].shape != t.shape for k, t in groups["meta"].items()):
            raise CheckpointError(f"{path}: best meta-parameters {_layout(groups['best'])} at "
                                  f"{_show({'best_step': b_step, 'best_loss': b_loss})} do not fit "
                                  f"{_layout(groups['meta'])} after {step} meta-steps")
        best = (b_step, float(b_loss), groups["best"])
    for group in ("meta", "loss", "best"):
        for k, t in groups[group].items():
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: tensor '{group}.{k}' holds non-finite values")
    adam = _read_adam(groups["adam"], groups, step - empty, learn, path)
    rng = groups["rng"]
    cuda_ok = all(k == "torch" or re.fullmatch(r"cuda\.(0|[1-9][0-9]*)", k) for k in rng)
    if "torch" not in rng or rng["torch"].shape != torch.get_rng_state().shape or not cuda_ok \
            or any(t.dim() != 1 for t in rng.values()):
        raise CheckpointError(f"{path}: generator states {sorted(rng)} are not valid")
    try:  # a state the generator refuses ("Invalid mt19937 state"), found now rather than mid-resume
        torch.Generator().set_state(rng["torch"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: generator state 'rng.torch' is not valid: {clip_text(e, 80)}") from None
    return Checkpoint(run=run, step=step, skipped=skipped, history=history, elapsed_s=float(elapsed),
                      device=progress["device"], meta=groups["meta"], loss=groups["loss"], adam=adam, rng=rng,
                      best=best)


def _read_adam(flat: dict[str, torch.Tensor], groups: dict, adam_steps: int, learn: str, path: Path) -> dict:
    """Adam's state per parameter, validated against the parameters and the step count."""
    adam: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        param, _, key = name.rpartition(".")
        group, _, pname = param.partition(".")
        if key not in _ADAM_KEYS or group not in ("meta", "loss") or pname not in groups[group]:
            raise CheckpointError(f"{path}: unexpected tensor 'adam.{name}'")
        adam.setdefault(param, {})[key] = t
    for param, state in adam.items():
        target = groups[param.split(".")[0]][param.partition(".")[2]]
        if sorted(state) != sorted(_ADAM_KEYS):
            raise CheckpointError(f"{path}: Adam state of {param!r} has {sorted(state)}; expected {list(_ADAM_KEYS)}")
        n = state["step"]
        if n.shape != () or n.dtype != torch.float32 or float(n) != adam_steps:
            raise CheckpointError(f"{path}: Adam step count of {param!r} is {n.tolist()}; expected the scalar "
                                  f"{adam_steps} (meta-steps that updated)")
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            if t.shape != target.shape or t.dtype != target.dtype or not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: Adam {key} of {param!r} must be finite "
                                      f"{tuple(target.shape)} {target.dtype}")
        if (state["exp_avg_sq"] < 0).any():
            raise CheckpointError(f"{path}: Adam exp_avg_sq of {param!r} is negative")
    metas = {p for p in adam if p.startswith("meta.")}
    if (adam_steps > 0) != bool(adam) or (adam and (
            metas != ({f"meta.{k}" for k in groups["meta"]} if learn != "loss" else set())
            or (learn != "optimizer") != any(p.startswith("loss.") for p in adam))):
        raise CheckpointError(f"{path}: Adam state for {sorted(adam)} does not fit learn = {learn!r} and "
                              f"{adam_steps} updating meta-steps")
    return adam


def open_metrics(path: str | Path, step: int) -> IO:
    """The metrics file opened for writing the records from meta-step ``step`` on: a new file
    at step 0; else the file cut after its first ``step`` records (which must be those of
    meta-steps ``0 .. step-1``), opened for appending.

    Raises:
        CheckpointError: the file is missing or holds fewer records than ``step``.
    """
    path = Path(path)
    if step == 0:
        return open(path, "w")
    data = path.read_bytes() if path.is_file() else b""
    offset = 0
    for i in range(step):
        end = data.find(b"\n", offset)
        try:
            ok = end >= 0 and json.loads(data[offset:end]).get("meta_step") == i
        except (ValueError, AttributeError, RecursionError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: holds no record of meta-step {i}, but the checkpoint is at meta-step "
                                  f"{step}; the metrics file was removed or edited, cannot resume")
        offset = end + 1
    with open(path, "r+b") as f:
        f.truncate(offset)
    return open(path, "a")
