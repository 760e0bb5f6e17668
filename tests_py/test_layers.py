"""The library does not depend on its evaluation harness: no library module imports
kvpack.eval, at import time or anywhere in its source; only the CLI (a front end) does."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "python" / "kvpack"
HARNESS = "kvpack.eval"
# Front ends, which may use the harness; everything else under python/kvpack is library.
FRONT_ENDS = {"cli.py", "__main__.py"}

LIBRARY_MODULES = (
    "kvpack",
    "kvpack.attention",
    "kvpack.clustering",
    "kvpack.compression",
    "kvpack.quantization",
    "kvpack.merging",
    "kvpack.methods",
    "kvpack.store",
    "kvpack.models",
    "kvpack.models.byte_tokenizer",
    "kvpack.models.pretrained",
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _library_files() -> list[Path]:
    files = [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "eval" not in path.relative_to(PACKAGE).parts[:-1]
        and path.relative_to(PACKAGE).as_posix() not in FRONT_ENDS
    ]
    assert PACKAGE / "store.py" in files and PACKAGE / "models" / "__init__.py" in files
    return files


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _harness_imports(source: str, module: str, is_package: bool) -> list[str]:
    """The imports of kvpack.eval (absolute, relative or by importlib) in ``source``, the
    text of ``module``; as absolute names, with their line."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def check(name: str, line: int) -> None:
        if name == HARNESS or name.startswith(HARNESS + "."):
            found.append(f"line {line}: {name}")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            check(origin, node.lineno)
            for alias in node.names:
                check(f"{origin}.{alias.name}", node.lineno)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if name in ("__import__", "import_module") and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    check(first.value, node.lineno)
    return found


def test_the_scan_finds_every_way_of_importing_the_harness():
    ways = (
        "import kvpack.eval",
        "import kvpack.eval.scoring as s",
        "from kvpack.eval import scoring",
        "from kvpack import eval",
        "from .eval import data",
        "from . import eval",
        "importlib.import_module('kvpack.eval.tasks')",
    )
    for source in ways:
        assert _harness_imports(source, "kvpack.store", False), source
    assert _harness_imports("from ..eval.tasks import corpus", "kvpack.models", True)
    assert _harness_imports("from .. import eval", "kvpack.models.pretrained", False)
    fine = "from . import methods\nfrom .models import load_tiny_lm\n'kvpack.eval in a string'"
    assert not _harness_imports(fine, "kvpack.store", False)
    assert not _harness_imports("from ..models import encode", "kvpack.models.x", False)


def test_no_library_source_imports_the_harness():
    offenders = {}
    for path in _library_files():
        found = _harness_imports(
            path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"
        )
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert not offenders, f"library modules import {HARNESS}: {offenders}"


def test_importing_the_library_loads_no_harness_module():
    modules = list(LIBRARY_MODULES)
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        modules.append("kvpack.hf")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m == {HARNESS!r} or "
        f"m.startswith({HARNESS + '.'!r})))\n"
    )
    run = _run(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", f"importing the library loaded {run.stdout.strip()}"


def test_the_harness_imports_without_torch():
    """kvpack.eval is light to import: torch and transformers load when a measure runs."""
    run = _run(
        "import sys\n"
        "import kvpack.eval\n"
        "from kvpack.eval import ruler_scores, fidelity\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["kvpack", "kvpack.models"])
def test_the_library_namespace_holds_no_harness(module):
    run = _run(f"import {module} as m; print(hasattr(m, 'eval'), hasattr(m, 'data'))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]
