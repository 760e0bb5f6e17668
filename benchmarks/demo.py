"""Wall time of ``kvpack demo`` on its embedded defaults against its 10-minute limit."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

LIMIT_SECONDS = 600.0


def run() -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "kvpack", "demo", "--quiet", "--out", out],
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - start
    return [
        (
            "kvpack demo wall time / 10-minute limit",
            f"{seconds / LIMIT_SECONDS:.2f} ({seconds:.0f} s)",
            "<= 1",
        )
    ]
