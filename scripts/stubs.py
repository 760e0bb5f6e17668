"""Writes kvpack's type stubs from the built extension, or checks the checked-in ones.

    python3 scripts/stubs.py           # python/kvpack/_core.pyi and methods.pyi
    python3 scripts/stubs.py --check   # exit 1 naming a stub that differs from the module

pybind11-stubgen reads the module as built: every signature, default and docstring comes
from the bindings (and the method classes from the core's registry), so a stub cannot
drift from what it describes. ``_core.pyi`` refers to ``from . import methods``, which a
type checker resolves to ``kvpack/methods.pyi``: the method classes, under the module
users import them from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "kvpack"
STUBS = {
    "_core.pyi": ("kvpack._core", "kvpack/_core/__init__.pyi"),
    "methods.pyi": ("kvpack.methods", "kvpack/methods.pyi"),
}


def generate(module: str, relative: str) -> str:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "pybind11_stubgen", module, "-o", out, "--exit-code"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        text = (Path(out) / relative).read_text()
    # The method classes live in kvpack.methods; their signatures name the binding's module.
    lines = [line for line in text.splitlines() if line != "import kvpack._core.methods"]
    return "\n".join(lines).replace("kvpack._core.methods.", "") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    check = parser.parse_args().check
    stale = []
    for name, (module, relative) in STUBS.items():
        text, path = generate(module, relative), PACKAGE / name
        if not check:
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(name)
    if stale:
        print(
            f"stubs: {', '.join(stale)} differ from the built module; "
            "run python3 scripts/stubs.py and commit the result"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
