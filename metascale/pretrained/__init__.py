"""Pretrained optimizers that ship inside the package: load one by name, no meta-training.

``metascale.load_optimizer("NAME", model.parameters())`` takes a name from :func:`catalog`
wherever it takes a file; ``metascale pretrained`` lists them. Each entry of ``catalog.json``
(next to this module) records the file (a versioned ``.safetensors`` export, a few KB), what it
was meta-trained on and how, its optimizer state per parameter, its figures on the held-out
benchmark suite (``metascale bench --suite heldout``), and when to prefer AdamW.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

CATALOG = "catalog.json"


def catalog() -> dict[str, dict]:
    """``{name: entry}`` of the shipped pretrained optimizers (see the module doc)."""
    text = resources.files(__name__).joinpath(CATALOG).read_text(encoding="utf-8")
    return {e["name"]: e for e in json.loads(text)["optimizers"]}


def resolve(name_or_path: str | Path) -> Path:
    """The file of a pretrained optimizer's name; a path is returned as it is (an existing file
    always wins over a name)."""
    path = Path(name_or_path)
    if path.exists() or isinstance(name_or_path, Path) or any(s in str(name_or_path) for s in ("/", "\\", ".")):
        return path
    entries = catalog()
    if name_or_path not in entries:
        return path  # not a name either: the loader reports the missing file
    return Path(str(resources.files(__name__).joinpath(entries[name_or_path]["file"])))


def name_of(path: str | Path) -> str | None:
    """The catalog name of a shipped file (``None`` for any other path)."""
    path = Path(path).resolve()
    return next((n for n in catalog() if resolve(n).resolve() == path), None)
