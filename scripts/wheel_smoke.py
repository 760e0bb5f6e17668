"""Checks an installed kvpack wheel from outside the source tree (scripts/wheel_test.sh).

Run with the Python of a fresh virtual environment holding only the wheel and its
requirements. Exits non-zero, naming what failed, when: kvpack is not the installed copy;
the extension needs a shared library that is neither in the wheel nor one the manylinux
policy lets it take from the system (glibc, libstdc++, libgcc_s), or a symbol none of them
defines; attention, a ClusterKV step, a compress or a store round trip through an SSD
directory gives a wrong answer; a build of the CPU kernels disagrees with the others; or
the extras stop naming themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

import kvpack

# Libraries every manylinux policy takes from the system (auditwheel's whitelist, the
# part a C++/OpenMP extension can need); anything else must come from the wheel.
SYSTEM_LIBRARIES = {
    "linux-vdso.so.1",
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "librt.so.1",
    "libpthread.so.0",
    "libstdc++.so.6",
    "libgcc_s.so.1",
}


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke test: {what}")


def installed_copy() -> Path:
    package = Path(kvpack.__file__).resolve().parent
    check(
        Path(sys.prefix).resolve() in package.parents,
        f"kvpack imported from {package}, not from the environment at {sys.prefix}",
    )
    return package


def libraries(package: Path) -> list[str]:
    """Every library the extension loads, each from the wheel or the system policy."""
    core = Path(kvpack._core.__file__).resolve()
    site = package.parent
    # -r: also resolve every symbol, so a library that is found but lacks one fails here.
    run = subprocess.run(["ldd", "-r", str(core)], capture_output=True, text=True, check=False)
    check(run.returncode == 0, f"ldd -r {core} failed: {run.stderr.strip()}")
    # The Python C API comes from the interpreter that imports the extension.
    undefined = re.findall(r"undefined symbol: (\S+)", run.stdout + run.stderr)
    undefined = [name for name in undefined if not re.match(r"_?Py", name)]
    check(not undefined, f"{core.name}: symbols no library defines: {', '.join(undefined)}")
    loaded = []
    for line in run.stdout.splitlines():
        # "name => path (address)", "name => not found" or "path (address)".
        match = re.fullmatch(r"\s*(\S+)(?: => (\S+|not found))?(?: \(0x[0-9a-f]+\))?\s*", line)
        if not match or line.startswith("undefined symbol"):
            continue
        name, path = match.group(1), match.group(2)
        check(path != "not found", f"{core.name} needs {name}, found neither in the wheel nor here")
        where = Path(path or name).resolve()
        from_wheel = site in where.parents
        check(
            from_wheel or name in SYSTEM_LIBRARIES or Path(name).name in SYSTEM_LIBRARIES,
            f"{core.name} takes {name} from {where}: not in the wheel, and not one the "
            "manylinux policy allows from the system",
        )
        loaded.append(f"{name} ({'wheel' if from_wheel else 'system'})")
    return loaded


def reference_attention(q, keys, values, indices=None):
    """Decode attention in NumPy float64, GQA, over all tokens or an index set per KV head."""
    heads_q, dim = q.shape
    group = heads_q // keys.shape[0]
    out = np.empty((heads_q, dim))
    for h in range(heads_q):
        k = keys[h // group].astype(np.float64)
        v = values[h // group].astype(np.float64)
        if indices is not None:
            k, v = k[indices[h // group]], v[indices[h // group]]
        s = k @ q[h] / np.sqrt(dim)
        w = np.exp(s - s.max())
        out[h] = w @ v / w.sum()
    return out


def functional() -> dict:
    rng = np.random.default_rng(0)
    heads_kv, heads_q, tokens, dim = 2, 8, 1024, 64
    keys = rng.standard_normal((heads_kv, tokens, dim), dtype=np.float32).astype(np.float16)
    values = rng.standard_normal(keys.shape, dtype=np.float32).astype(np.float16)
    q = rng.standard_normal((heads_q, dim), dtype=np.float32)

    dense = kvpack.attention(q, keys, values)
    error = np.abs(dense - reference_attention(q, keys, values)).max()
    check(error < 1e-4, f"dense attention differs from NumPy by {error:.2e}")
    indices = np.sort(rng.choice(tokens, (heads_kv, 96), replace=False), axis=1).astype(np.int32)
    sparse = kvpack.attention(q, keys, values, indices)
    error = np.abs(sparse - reference_attention(q, keys, values, indices)).max()
    check(error < 1e-4, f"sparse attention differs from NumPy by {error:.2e}")

    recall = kvpack.RecallCache(budget=128)
    recall.prefill(keys, values)
    new_key = rng.standard_normal((heads_kv, dim), dtype=np.float32).astype(np.float16)
    new_value = rng.standard_normal((heads_kv, dim), dtype=np.float32).astype(np.float16)
    out = recall.step(q, new_key, new_value)
    selection = recall.last_selection
    all_keys = np.concatenate([keys, new_key[:, None]], axis=1)
    all_values = np.concatenate([values, new_value[:, None]], axis=1)
    error = np.abs(out - reference_attention(q, all_keys, all_values, selection)).max()
    check(error < 1e-4, f"the ClusterKV step differs from attention over its selection: {error}")
    check(tokens in selection[0], "the ClusterKV step did not attend its own token")

    queries = rng.standard_normal((heads_q, 16, dim), dtype=np.float32)
    compressed = kvpack.compress(keys, values, "kvmerger", 0.5, queries=queries)
    check(
        compressed.keys.shape == (heads_kv, tokens // 2, dim),
        f"compress to half: keys of shape {compressed.keys.shape}",
    )
    check(int(compressed.counts.sum()) == heads_kv * tokens, "compress lost count of tokens")

    with tempfile.TemporaryDirectory() as ssd:
        kv = [(keys, values), (keys[:, ::-1].copy(), values[:, ::-1].copy())]
        context = list(range(300))
        options = dict(dram_bytes=1 << 20, ssd_dir=ssd, ssd_bytes=64 << 20, secret=b"wheel")
        with kvpack.TieredStore(**options, policy="lru") as store:
            store.put(context, kv, probe_queries=[queries, queries])
        with kvpack.TieredStore(**options, policy="lru") as reopened:  # read back from disk
            got = reopened.get(context)
        check(got.tier == "ssd", f"the stored entry came back from {got.tier!r}, not the SSD")
        for (k, v), (k2, v2) in zip(kv, got.kv):
            check(np.array_equal(k, k2) and np.array_equal(v, v2), "the store round trip differs")
    return {"dense": dense.tolist(), "labels": kvpack.kmeans(keys, 16).labels.tolist()}


def every_build() -> list[str]:
    """Runs the same work on each build of the CPU kernels this processor runs."""
    builds = kvpack.cpu_targets()
    check(kvpack.cpu_target() == builds[0], f"kvpack runs {kvpack.cpu_target()}, not {builds[0]}")
    results = {}
    for target in builds:
        env = dict(os.environ, KVPACK_CPU_TARGET=target)
        run = subprocess.run(
            [sys.executable, "-I", __file__, "--functional"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        check(run.returncode == 0, f"with KVPACK_CPU_TARGET={target}: {run.stdout}{run.stderr}")
        results[target] = json.loads(run.stdout)
        check(results[target]["target"] == target, f"KVPACK_CPU_TARGET={target} was not used")
    best = results[builds[0]]
    for target, result in results.items():
        error = np.abs(np.array(result["dense"]) - np.array(best["dense"])).max()
        check(error < 1e-5, f"{target} and {builds[0]} attention differ by {error:.2e}")
    env = dict(os.environ, KVPACK_CPU_TARGET="z80")
    run = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import kvpack, numpy as n; kvpack.attention("
            "n.ones((1, 4), 'f4'), n.ones((1, 2, 4), 'f4'), n.ones((1, 2, 4), 'f4'))",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    check("KVPACK_CPU_TARGET" in run.stderr, f"an unknown KVPACK_CPU_TARGET: {run.stderr}")
    return builds


def extras() -> None:
    """`kvpack demo` without torch names the extra in one line; the extra pulls torch."""
    if importlib.util.find_spec("torch") is None:
        run = subprocess.run(
            [sys.executable, "-I", "-m", "kvpack", "demo"], capture_output=True, text=True
        )
        message = run.stderr.strip()
        check(
            run.returncode != 0 and "kvpack[models]" in message and len(message.splitlines()) == 1,
            f"kvpack demo without torch said: {message!r}",
        )
    models = [r for r in metadata.requires("kvpack") or [] if 'extra == "models"' in r]
    for name in ("torch", "transformers", "safetensors", "gguf", "accelerate"):
        check(any(r.startswith(name) for r in models), f"kvpack[models] does not pull {name}")


def main() -> None:
    if sys.argv[1:] == ["--functional"]:
        result = functional()
        print(json.dumps({"target": kvpack.cpu_target(), **result}))
        return
    package = installed_copy()
    loaded = libraries(package)
    functional()
    builds = every_build()
    extras()
    print(f"wheel smoke test passed: kvpack {kvpack.__version__} from {package}")
    print(f"  CPU kernels: {', '.join(builds)} (running {kvpack.cpu_target()})")
    print(f"  libraries: {', '.join(loaded)}")


if __name__ == "__main__":
    main()
