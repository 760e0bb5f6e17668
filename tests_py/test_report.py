"""RESULTS.md: verdicts on the targets, rendering from saved runs, and the committed file."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.__main__ import SUITES  # noqa: E402


@pytest.mark.parametrize(
    "value, target, expected",
    [
        ("0.74", ">= 0.60", "holds"),
        ("0.55 (0.70 vs 1.27 GB/s)", ">= 0.70", "does not hold"),
        ("16.2x", ">= 15x", "holds"),
        ("47.3 ms = 4.14x memcpy", "<= 4x memcpy", "does not hold"),
        ("24.4 ms = 2.14x memcpy", "<= 4x memcpy", "holds"),
        ("3.03 GB/s", ">= 2 GB/s", "holds"),
        ("streaming-lru: 2.91x", ">= 1.4", "holds"),
        ("kivi2-lru: -0.0100", "> 0", "does not hold"),
        ("+0.0300 (0.95 vs 0.92)", "> 0", "holds"),
        ("n/a (quality 1.0000 beyond the curve)", ">= 1.4", "does not hold"),
        ("60% of 20", "within 5 points of full: holds (+0 points)", "holds"),
        ("20% of 20", "within 5 points of full: does not hold (+40 points)", "does not hold"),
        ("11.2 GB/s", "reference", ""),
        ("1.92x", "scales", ""),
        ("0.955", "", ""),
    ],
)
def test_verdict(value, target, expected):
    assert report.verdict(value, target) == expected


def test_render_from_saved_runs(tmp_path):
    rows = [("dense / clusterkv step", "14.2x", ">= 10x"), ("prefill", "5391 ms", "")]
    report.record("clusterkv", "ClusterKV decode step", "python -m benchmarks", rows, tmp_path)
    report.record("extra", "Another suite", "python -m benchmarks --only extra", [], tmp_path)
    out, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_START}\nold\n{report.README_END}\n\nrest\n")
    text = report.render(["clusterkv"], tmp_path, out, readme)
    assert out.read_text() == text
    claims = report.claims_table(report.load_records(["clusterkv"], tmp_path))
    assert readme.read_text() == "\n".join(
        ["# x", "", report.README_START, *claims, report.README_END, "", "rest", ""]
    )
    lines = text.splitlines()
    claim = next(line for line in lines if "decode faster than full attention" in line)
    assert "| clusterkv: dense / clusterkv step | 14.2x | >= 10x | holds |" in claim
    assert any("negligible accuracy loss" in line and "not run" in line for line in lines)
    assert "| clusterkv | dense / clusterkv step | 14.2x | >= 10x | holds |" in lines
    assert not any(line.startswith("| clusterkv | prefill") for line in lines)  # no target
    # Sections in the given order, then the others by name.
    assert text.index("## ClusterKV decode step") < text.index("## Another suite")
    assert "- command: `python -m benchmarks --only extra`" in lines


def test_committed_results_match_the_saved_runs():
    """RESULTS.md and the README's claims table say what the saved runs say."""
    rendered = report.render(list(SUITES), results=None, readme=None)
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == rendered
    readme = (ROOT / "README.md").read_text()
    assert report.README_START in readme
    claims = report.claims_table(report.load_records(list(SUITES)))
    assert report.with_claims(readme, claims) == readme


def test_report_command_renders():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--report"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "RESULTS.md" in result.stdout
