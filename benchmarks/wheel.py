"""The wheel against the source build: the attention and clusterkv suites on each.

The source build is kvpack as this interpreter imports it (``pip install -e .``: the whole
core compiled with -march=native); the wheel is dist/kvpack-*.whl from scripts/wheel.sh,
installed into a virtual environment of its own (``KVPACK_WHEEL_PYTHON``, else
build/wheel-venv, made here when missing): the core for baseline x86-64 and the kernels
chosen at run time. Each suite runs in a fresh process of each interpreter, the two
alternating for ``rounds`` rounds, and every timing keeps the best of its rounds, so a
burst of load on a shared machine does not land on one build only.
Target (issue: a self-contained wheel): the wheel within 5% of the source build's time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("attention", "clusterkv")
_TIME = re.compile(r"\s*(\d+(?:\.\d+)?) (s|ms|us)\b")
_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def wheel_python() -> Path:
    """The interpreter of the environment holding the wheel (made when missing)."""
    given = os.environ.get("KVPACK_WHEEL_PYTHON")
    if given:
        return Path(given)
    python = ROOT / "build" / "wheel-venv" / "bin" / "python"
    if not python.exists():
        wheels = sorted((ROOT / "dist").glob("kvpack-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(
                "benchmarks wheel: expected one dist/kvpack-*.whl (bash scripts/wheel.sh), "
                f"found {len(wheels)}"
            )
        venv.create(python.parent.parent, with_pip=True)
        constraints = ROOT / "scripts" / "constraints.txt"
        install = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
        subprocess.run([*install, str(wheels[0])], check=True)
    return python


def _suite(python: Path, name: str) -> dict:
    """One suite's rows, and which kvpack ran them, from a fresh process of `python`."""
    run = subprocess.run(
        [str(python), "-m", "benchmarks.wheel", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise RuntimeError(f"{python} -m benchmarks.wheel {name} failed:\n{run.stderr}")
    return json.loads(run.stdout.splitlines()[-1])


def _seconds(value: str) -> float | None:
    found = _TIME.match(value)
    return float(found.group(1)) * _SCALE[found.group(2)] if found else None


def run(rounds: int = 2) -> list[tuple[str, str, str]]:
    builds = {"source": Path(sys.executable), "wheel": wheel_python()}
    best: dict[tuple[str, str, str], float] = {}
    seen: dict[str, dict] = {}
    for _ in range(rounds):
        for build, python in builds.items():
            for name in SUITES:
                result = _suite(python, name)
                seen[build] = result
                for metric, value, _target in result["rows"]:
                    seconds = _seconds(value)
                    if seconds is not None:
                        key = (build, name, metric)
                        best[key] = min(best.get(key, float("inf")), seconds)
    source, wheel = seen["source"], seen["wheel"]
    rows = [
        ("source build", f"{source['where']}, kernels {source['target']}", "reference"),
        ("wheel", f"{wheel['where']}, kernels {wheel['target']}", ""),
    ]
    for (build, name, metric), seconds in best.items():
        if build != "source":
            continue
        other = best[("wheel", name, metric)]
        times = f"wheel {other * 1e3:.3f} ms, source {seconds * 1e3:.3f} ms"
        ratio = f"{other / seconds:.3f} ({times})"
        rows.append((f"{name}: {metric}: wheel / source time", ratio, "<= 1.05"))
    return rows


def _worker(name: str) -> None:
    import kvpack

    from . import attention, clusterkv

    rows = {"attention": attention.run, "clusterkv": clusterkv.run}[name]()
    where = Path(kvpack.__file__).resolve().parent
    print(json.dumps({"rows": rows, "where": str(where), "target": kvpack.cpu_target()}))


if __name__ == "__main__":
    _worker(sys.argv[1])
