"""Optional dependencies, checked before work starts.

The core needs NumPy alone; models, plots and the benchmarks need an extra. Entry points
call :func:`require` first, so a missing package is one line naming the extra to install,
not a traceback minutes into a run.
"""

from __future__ import annotations

import importlib.util

# The extra of pyproject.toml that installs each optional module.
EXTRA_OF = {
    "torch": "models",
    "transformers": "models",
    "safetensors": "models",
    "matplotlib": "models",
    "faiss": "bench",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra."""


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported (none is imported here)."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def require(what: str, *modules: str) -> None:
    """Raises :class:`MissingExtra` when any of ``modules`` is missing.

    Parameters
    ----------
    what : str
        What needs them, as the message says it (``"kvpack demo"``).
    modules : str
        Top-level module names, keys of :data:`EXTRA_OF`.
    """
    absent = missing(*modules)
    if absent:
        extras = ",".join(sorted({EXTRA_OF[name] for name in absent}))
        raise MissingExtra(
            f"{what} needs {', '.join(absent)}, not installed: pip install 'kvpack[{extras}]'"
        )
