"""The wheel against the source build: the attention and clusterkv suites on each.

The source build is kvpack as this interpreter imports it (``pip install -e .``: the whole
core compiled with -march=native); the wheel is dist/kvpack-*.whl from scripts/wheel.sh,
installed into a virtual environment of its own (``KVPACK_WHEEL_PYTHON``, else
build/wheel-venv, made here when missing): the core for baseline x86-64 and the kernels
chosen at run time. Everything runs in fresh processes of each interpreter.

Two measures. The attention and clusterkv suites run once on each build, their wall
times side by side (on a 2-core machine shared with other jobs these move by tens of
percent from run to run, whichever the build). The comparison with a target times the
suites' hot operations on one thread in CPU seconds, which other processes on the
machine do not inflate: dense and sparse attention at 32k tokens, and ClusterKV's and
Quest's prefill and decode step at 16k tokens (the suite's 32k prefill takes 12 s on one
thread), the builds alternating for ``rounds`` rounds, each keeping its best.
Target (issue: a self-contained wheel): the wheel within 5% of the source build's time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np

from .common import best_seconds

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


def _worker_run(python: Path, what: str) -> dict:
    """The JSON a fresh process of `python` prints for `what` (a suite, or "kernels")."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "passive")  # as scripts/test.sh: no spinning workers
    run = subprocess.run(
        [str(python), "-m", "benchmarks.wheel", what],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise RuntimeError(f"{python} -m benchmarks.wheel {what} failed:\n{run.stderr}")
    return json.loads(run.stdout.splitlines()[-1])


def _seconds(value: str) -> float | None:
    found = _TIME.match(value)
    return float(found.group(1)) * _SCALE[found.group(2)] if found else None


def run(rounds: int = 5) -> list[tuple[str, str, str]]:
    builds = {"source": Path(sys.executable), "wheel": wheel_python()}
    best: dict[tuple[str, str], float] = {}
    seen: dict[str, dict] = {}
    for _ in range(rounds):
        for build, python in builds.items():
            result = _worker_run(python, "kernels")
            seen[build] = result
            for metric, seconds in result["seconds"].items():
                best[(build, metric)] = min(best.get((build, metric), float("inf")), seconds)
    source, wheel = seen["source"], seen["wheel"]
    rows = [
        ("source build", f"{source['where']}, kernels {source['target']}", "reference"),
        ("wheel", f"{wheel['where']}, kernels {wheel['target']}", ""),
    ]
    for metric in source["seconds"]:
        mine, theirs = best[("wheel", metric)], best[("source", metric)]
        times = f"wheel {mine * 1e3:.3f} ms, source {theirs * 1e3:.3f} ms"
        rows.append(
            (f"{metric}: wheel / source CPU time", f"{mine / theirs:.3f} ({times})", "<= 1.05")
        )
    for name in SUITES:  # the suites themselves, once on each build, wall time
        runs = {build: _worker_run(python, name)["rows"] for build, python in builds.items()}
        for (metric, value, _), (_, other, _) in zip(runs["source"], runs["wheel"]):
            if _seconds(value) is not None:
                rows.append((f"{name} suite: {metric}", f"source {value}, wheel {other}", ""))
    return rows


def _kernels() -> dict[str, float]:
    """CPU seconds, one thread, of the attention and clusterkv suites' hot operations."""
    import kvpack
    from kvpack.eval.data import synthetic_llama_cache

    kvpack.set_num_threads(1)
    tokens, budget, steps = 32768, 1024, 64
    cache = synthetic_llama_cache(tokens + steps, dtype="float16", seed=0)
    keys = np.ascontiguousarray(cache.keys[:, :tokens])
    values = np.ascontiguousarray(cache.values[:, :tokens])
    q = cache.query
    rng = np.random.default_rng(0)
    indices = np.sort(
        np.stack([rng.choice(tokens, budget, replace=False) for _ in range(keys.shape[0])]), axis=1
    ).astype(np.int32)
    seconds = {
        f"dense attention over {tokens} tokens": best_seconds(
            lambda: kvpack.attention(q, keys, values), 9, clock=time.process_time
        ),
        f"sparse attention over {budget} tokens": best_seconds(
            lambda: kvpack.attention(q, keys, values, indices), 45, clock=time.process_time
        ),
    }
    prompt = tokens // 2
    queries = q[None] + 0.1 * rng.standard_normal((steps, *q.shape)).astype(np.float32)
    for method in ("clusterkv", "quest"):
        recall = kvpack.RecallCache(budget=budget, method=method)
        start = time.process_time()
        recall.prefill(
            np.ascontiguousarray(keys[:, :prompt]), np.ascontiguousarray(values[:, :prompt])
        )
        seconds[f"{method} prefill of {prompt} tokens"] = time.process_time() - start
        times = []
        for s in range(steps):
            token = prompt + s
            start = time.process_time()
            recall.step(queries[s], cache.keys[:, token], cache.values[:, token])
            times.append(time.process_time() - start)
        seconds[f"{method} decode step at {prompt} tokens, median of {steps}"] = float(
            np.median(times)
        )
    return seconds


def _worker(what: str) -> None:
    import kvpack

    if what == "kernels":
        result = {"seconds": _kernels()}
    else:
        from . import attention, clusterkv

        result = {"rows": {"attention": attention.run, "clusterkv": clusterkv.run}[what]()}
    where = Path(kvpack.__file__).resolve().parent
    print(json.dumps({**result, "where": str(where), "target": kvpack.cpu_target()}))


if __name__ == "__main__":
    _worker(sys.argv[1])
