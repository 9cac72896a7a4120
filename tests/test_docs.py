"""The docs cannot rot.

* docs/user-guide.md runs: in a temporary folder (with a copy of ``tasks/``), in document
  order, every ```` ```toml ```` / ```` ```python ```` block whose first line is
  ``# file: PATH`` is written to ``PATH``, every other ```` ```python ```` block is executed,
  and every ``metascale ...`` / ``python FILE.py ...`` line of a ```` ```bash ```` block must
  exit 0, all with tiny budgets (every spec shrunk to 2 meta-steps of 2 tasks, at most 4 inner
  steps, 3 held-out tasks and a 5-point tuning grid). The spec files it writes must load.
* The spec reference in the guide names every key of every config dataclass.
* docs/api.md shows every public name (``__all__`` of the package and its subpackages, and
  the functions of ``metascale.evaluate`` and ``metascale.report`` the guide uses) with its
  current signature; ``python tests/test_docs.py --write`` regenerates docs/api.md from the
  code (signatures by ``inspect``, the first paragraph of each docstring).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
GUIDE = REPO / "docs" / "user-guide.md"
API = REPO / "docs" / "api.md"
FAQ = REPO / "docs" / "faq.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```[ \t]*$", re.S | re.M)
INSTALL_COMMANDS = ("bash", "source", "pip")  # setup lines, run by scripts/*.sh, not here


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, in document order."""
    return FENCE.findall(path.read_text(encoding="utf-8"))


def file_target(body: str) -> str | None:
    m = re.match(r"#\s*file:\s*(\S+)\s*\n", body)
    return m.group(1) if m else None


def command_lines(body: str) -> list[list[str]]:
    """The commands of a bash block as argv lists (comments dropped, ``\\`` continuations joined)."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


# --------------------------------------------------------------------------- tiny budgets
@pytest.fixture
def tiny_budgets(monkeypatch):
    """Shrink every spec loaded (``spec_from_dict`` is behind ``load_spec`` and the checks of
    exported files), cap explicit ``meta_steps`` and held-out ``n_tasks``/``steps``."""
    import metascale.evaluate as evaluate_mod
    import metascale.spec as spec_mod
    from metascale.meta import MetaTrainer

    replace = dataclasses.replace
    orig_spec, orig_init, orig_eval = spec_mod.spec_from_dict, MetaTrainer.__init__, evaluate_mod.evaluate

    def spec_from_dict(*args, **kwargs):
        s = orig_spec(*args, **kwargs)
        return replace(s, meta=replace(s.meta, steps=min(s.meta.steps, 2), batch_size=2),
                       inner=replace(s.inner, steps=min(s.inner.steps, 4), windows=min(s.inner.windows, 2)),
                       evaluate=replace(s.evaluate, tasks=min(s.evaluate.tasks, 3), tune_tasks=2,
                                        lr_min=1e-4, lr_max=1.0, points_per_decade=1,
                                        steps=min(s.evaluate.steps, 4)))

    def init(self, spec, **kwargs):
        if kwargs.get("meta_steps") is not None:
            kwargs["meta_steps"] = min(kwargs["meta_steps"], 2)
        orig_init(self, spec, **kwargs)

    def evaluate(learned, spec, **kwargs):
        for key, cap in (("n_tasks", 3), ("steps", 4)):
            if kwargs.get(key):
                kwargs[key] = min(kwargs[key], cap)
        return orig_eval(learned, spec, **kwargs)

    monkeypatch.setattr(spec_mod, "spec_from_dict", spec_from_dict)
    monkeypatch.setattr(MetaTrainer, "__init__", init)
    monkeypatch.setattr(evaluate_mod, "evaluate", evaluate)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A temporary working folder with a copy of tasks/ on sys.path; the families registry and
    the modules the guide writes are restored afterwards."""
    from metascale.tasks import FAMILIES
    shutil.copytree(REPO / "tasks", tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    families, modules = dict(FAMILIES), set(sys.modules)
    yield tmp_path
    FAMILIES.clear()
    FAMILIES.update(families)
    for name in set(sys.modules) - modules:
        if getattr(sys.modules[name], "__file__", None) and str(tmp_path) in sys.modules[name].__file__:
            del sys.modules[name]


# --------------------------------------------------------------------------- the guide
def test_user_guide_runs(sandbox, tiny_budgets, monkeypatch):
    from metascale.cli import main
    from metascale.spec import load_spec

    blocks = fenced_blocks(GUIDE)
    assert sum(lang == "python" for lang, _ in blocks) >= 6  # the guide has not lost its examples
    written, ran, commands = [], 0, 0
    for i, (lang, body) in enumerate(blocks):
        where = f"{GUIDE.name} block {i} ({lang})"
        target = file_target(body)
        if target is not None:
            assert lang in ("python", "toml"), where
            path = sandbox / target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8")
            written.append(path)
        elif lang == "python":
            exec(compile(body, where, "exec"), {"__name__": f"user_guide_block_{i}"})
            ran += 1
        elif lang == "bash":
            for argv in command_lines(body):
                if argv[0] in INSTALL_COMMANDS:
                    continue
                if argv[0] == "metascale":
                    code = main(argv[1:])
                elif argv[0] == "python" and argv[1].endswith(".py"):
                    monkeypatch.setattr(sys, "argv", argv[1:])
                    try:
                        runpy.run_path(argv[1], run_name="__main__")
                        code = 0
                    except SystemExit as e:
                        code = e.code or 0
                else:
                    pytest.fail(f"{where}: no rule to run {argv[0]!r}; add one to tests/test_docs.py")
                assert code == 0, f"{where}: {shlex.join(argv)} exited {code}"
                commands += 1
    assert ran >= 4 and commands >= 8, (ran, commands)
    specs = [p for p in written if p.suffix == ".toml"]
    assert len(specs) >= 2
    for path in specs:  # the documented specs are valid (families registered by the guide)
        load_spec(path)
    # what the guide promises exists
    for f in ("optimizer.safetensors", "metrics.jsonl", "eval.json", "report.md", "schedules.png", "heldout.png"):
        assert (sandbox / "runs" / "sine" / f).is_file(), f
    assert (sandbox / "runs" / "cubic-cli" / "report.md").is_file()


def test_spec_reference_names_every_key():
    """Every key of every spec table and family config is in the guide's reference tables."""
    from metascale.optim import spec_tables
    from metascale.spec import EvaluateConfig, InnerConfig, MetaConfig, tables
    from metascale.tasks import FAMILIES

    text = GUIDE.read_text(encoding="utf-8")
    reference = text[text.index("### The tables and their keys"):text.index("## 4. Writing a task family")]
    for table in tables()[1:]:
        assert f"[{table}]" in reference, table
    configs = [InnerConfig, MetaConfig, EvaluateConfig, *spec_tables().values()]
    configs += [cfg for _, cfg in FAMILIES.values()]
    for cls in configs:
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in reference, f"{cls.__name__}.{field.name} is not in the guide's spec reference"
    for family in FAMILIES:
        assert f"| `{family}` |" in reference, family


def test_readme_links_the_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for doc in ("docs/user-guide.md", "docs/api.md", "docs/faq.md"):
        assert f"]({doc})" in readme, doc
        assert (REPO / doc).is_file(), doc


def test_faq_code_is_real():
    """The FAQ's commands name real subcommands and flags."""
    from metascale.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for lang, body in fenced_blocks(FAQ):
        for argv in command_lines(body) if lang == "bash" else []:
            if argv[0] != "metascale":
                continue
            assert argv[1] in sub.choices, argv
            flags = {o for a in sub.choices[argv[1]]._actions for o in a.option_strings}
            for arg in argv[2:]:
                if arg.startswith("--"):
                    assert arg.split("=")[0] in flags, (argv, arg)


# --------------------------------------------------------------------------- the API reference
# extra modules whose functions the guide uses (they are not re-exported by a package)
EXTRA = {"metascale.evaluate": ["evaluate", "format_table", "tune_lr", "train_curve", "train_run",
                                "EvaluateConfig", "BASELINES"],
         "metascale.report": ["make_report", "load_run", "trace_schedules", "Report", "RunData",
                              "ScheduleTrace"],
         "metascale.config": ["check", "from_table", "to_dict"],
         "metascale.interop.learn2learn": ["Learn2LearnSampler", "learn2learn_spec"],
         "metascale.spec": ["Spec", "load_spec", "spec_from_dict", "default_spec_dir"],
         "metascale.tasks.base": ["Task", "TaskFamily", "TaskSampler", "mix_seed", "generator", "uniform",
                                  "log_uniform", "randint", "mlp", "seeded_init_", "ACTIVATIONS"]}
PACKAGES = ["metascale", "metascale.export", "metascale.inner", "metascale.losses", "metascale.meta",
            "metascale.optim", "metascale.scaling", "metascale.tasks", "metascale.interop"]


def public_names() -> list[tuple[str, str]]:
    """``(module, name)`` of everything docs/api.md must document."""
    out = []
    for mod in PACKAGES:
        m = importlib.import_module(mod)
        out += [(mod, n) for n in getattr(m, "__all__", []) if n != "__version__"]
    for mod, names in EXTRA.items():
        out += [(mod, n) for n in names]
    return out


def _annotation(a) -> str:
    # ``from __future__ import annotations`` keeps annotations as source text: show it unquoted
    return a.strip("'\"") if isinstance(a, str) else inspect.formatannotation(a)


def _default(value) -> str:
    """``repr`` of a default; a dataclass config shows only the fields that differ from its
    class defaults (``LossConfig(kind='adaptive_scale')``), so adding a field to a config does
    not change the signatures that merely use it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fresh = type(value)()
        diff = [f"{f.name}={getattr(value, f.name)!r}" for f in dataclasses.fields(value)
                if f.init and getattr(value, f.name) != getattr(fresh, f.name)]
        return f"{type(value).__name__}({', '.join(diff)})"
    return repr(value)


def _parameters(sig: inspect.Signature) -> str:
    parts, star = [], False
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        if p.kind == p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind == p.VAR_POSITIONAL:
            star = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + _default(p.default)
        parts.append(text)
        if p.kind == p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind != p.POSITIONAL_ONLY):
            parts.append("/")
    return f"({', '.join(parts)})"


def signature(obj, name: str) -> str:
    """The one-line signature docs/api.md shows: ``name(args) -> ret`` for functions,
    ``class name(args)`` (the constructor) for classes, ``class name(bases)`` for exceptions,
    ``name = value`` or ``name: type`` for other values."""
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return f"class {name}({', '.join(b.__name__ for b in obj.__bases__)})"
    if inspect.isclass(obj) or callable(obj):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return f"{name}(...)"
        if inspect.isclass(obj):
            return f"class {name}{_parameters(sig)}"
        ret = "" if sig.return_annotation is sig.empty else f" -> {_annotation(sig.return_annotation)}"
        return f"{name}{_parameters(sig)}{ret}"
    if isinstance(obj, dict):
        return f"{name}: dict  # keys: {', '.join(map(str, obj))}"
    text = repr(obj)
    return f"{name} = {text}" if len(text) <= 100 else f"{name}: {type(obj).__name__}"


def summary_line(obj) -> str:
    """The first paragraph of a docstring, reST roles turned into markdown code."""
    doc = inspect.getdoc(obj) if (inspect.isclass(obj) or callable(obj) or inspect.ismodule(obj)) else None
    if not doc:
        return ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = re.sub(r":(?:func|class|mod|data|meth|attr|math):`~?([^`]+)`", r"`\1`", first)
    return first.replace("``", "`")


def test_api_reference_is_current():
    text = API.read_text(encoding="utf-8")
    stale = []
    for mod, name in public_names():
        obj = getattr(importlib.import_module(mod), name)
        if f"`{mod}.{name}`" not in text:
            stale.append(f"{mod}.{name}: not documented")
            continue
        sig = signature(obj, name)
        if (inspect.isclass(obj) or callable(obj)) and sig not in text:
            stale.append(f"{mod}.{name}: signature changed; now\n    {sig}")
    assert not stale, "docs/api.md is out of date (python tests/test_docs.py --write):\n" + "\n".join(stale)


# values have no docstring of their own
VALUE_DOCS = {
    "FORMAT": "The `format` metadata of an exported optimizer file.",
    "FORMAT_VERSION": "The file format version this metascale writes and reads.",
    "ENGINES": "The differentiable inner-loop engines (`[inner] engine`).",
    "KINDS": "The learned-loss kinds (`--loss`, `LossConfig.kind`).",
    "MAPPING_RULE": "The role/depth group mapping rule, written into every exported file.",
    "ROLES": "The parameter roles: `matrix` (`p.dim() >= 2`) and `vector`.",
    "RULES": "The learnable rules (`--rule`).",
    "FAMILIES": "Task families by name: `(family class, config class)`; add yours here (user guide, section 4).",
    "BASELINES": "The baselines of `evaluate`: name -> factory `(params, lr) -> optimizer`.",
    "ACTIVATIONS": "Activation modules by name, for family configs.",
}

INTRO = """# API reference

Every public name: what `metascale` and its subpackages export (`__all__`), and the
functions of the modules `metascale.evaluate`, `metascale.report`, `metascale.spec`,
`metascale.config` and `metascale.tasks.base` that the [user guide](user-guide.md) uses.
Signatures are generated from the code with `inspect` and the descriptions are the first
paragraph of each docstring (the docstrings carry the math and the examples); regenerate with
`python tests/test_docs.py --write`. `tests/test_docs.py` fails when a public name or a
signature changes and this file does not.

Most users need four names: `metascale.load_spec`, `metascale.MetaTrainer`,
`metascale.save_optimizer` and `metascale.load_optimizer`.
"""


def render_api() -> str:
    """docs/api.md from the code (signatures, first docstring paragraph)."""
    names = public_names()
    modules = list(dict.fromkeys(mod for mod, _ in names))
    lines = [INTRO, "Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m in modules) + ".", ""]
    last = None
    for mod, name in names:
        if mod != last:
            m = importlib.import_module(mod)
            lines += [f"## `{mod}`", "", summary_line(m), ""]
            last = mod
        obj = getattr(importlib.import_module(mod), name)
        doc = summary_line(obj) if (inspect.isclass(obj) or callable(obj)) else VALUE_DOCS.get(name, "")
        lines += [f"### `{mod}.{name}`", "", "```python", signature(obj, name), "```", "", doc, ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        API.write_text(render_api(), encoding="utf-8")
        print(f"wrote {API}")
    else:
        print(render_api())
