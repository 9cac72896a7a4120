"""The library's own error types.

Every error caused by bad input (a spec, an exported file, a command-line argument) is a
:class:`MetascaleError`; the command line turns it into a one-line message and exit code 2.
"""


def install_hint(extra: str) -> str:
    """How to install an optional extra: metascale is installed from its repository (there is no
    ``metascale`` package on the package index, so ``pip install 'metascale[...]'`` fails)."""
    return f"pip install -e '.[{extra}]' in the metascale repository (bash scripts/setup.sh installs every extra)"


class MetascaleError(Exception):
    """Base class of every error metascale raises on purpose."""


class SpecError(MetascaleError, ValueError):
    """A task-distribution spec (TOML) is malformed, has an unknown key or an out-of-range value."""


class ExportFormatError(MetascaleError, ValueError):
    """An exported optimizer file is truncated, of another format version, or has wrong tensors."""


class MissingExtraError(MetascaleError, ImportError):
    """An optional integration was used without its extra installed."""


class CheckpointError(MetascaleError, ValueError):
    """A meta-training checkpoint is missing, corrupted, of another format version, or from
    another run (spec, seed, learn mode or rule) than the one asked to resume."""


class StateError(MetascaleError, ValueError):
    """An optimizer ``state_dict`` that does not fit the optimizer loading it: another rule,
    other meta-parameters, another model's shapes, or malformed values."""
