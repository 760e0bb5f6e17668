"""kvpress's presses as references for kvpack's methods, compared at the scoring level.

kvpress's package ``__init__`` imports its pipeline and evaluation (datasets, peft, ...),
which kvpack does not install; a press module needs only torch. This loads the press
modules under empty parent packages, so ``__init__`` never runs. Tests skip when kvpress
is absent (scripts/setup.sh installs it with ``--no-deps``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def press(module: str, name: str):
    """The press class ``name`` of ``kvpress.presses.<module>``."""
    pytest.importorskip("torch")
    if "kvpress.presses" not in sys.modules:
        spec = importlib.util.find_spec("kvpress")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("kvpress is not installed (scripts/setup.sh installs it)")
        root = spec.submodule_search_locations[0]
        for package, path in (("kvpress", root), ("kvpress.presses", f"{root}/presses")):
            stub = types.ModuleType(package)
            stub.__path__ = [path]
            sys.modules[package] = stub
    return getattr(importlib.import_module(f"kvpress.presses.{module}"), name)
