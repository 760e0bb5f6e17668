"""RESULTS.md: verdicts on the targets, rendering from saved runs, and the committed file."""

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


def test_report_command_renders(tmp_path, monkeypatch, capsys):
    from benchmarks.__main__ import main

    rows = [("dense / clusterkv step", "14.2x", ">= 10x")]
    report.record("clusterkv", "ClusterKV decode step", "python -m benchmarks", rows, tmp_path)
    monkeypatch.setattr(report, "RECORDS", tmp_path)
    monkeypatch.setattr(report, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(report, "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(f"{report.README_START}\n{report.README_END}\n")
    assert main(["--report"]) == 0
    assert "RESULTS.md" in capsys.readouterr().out
    assert "| dense / clusterkv step | 14.2x | >= 10x |" in (tmp_path / "RESULTS.md").read_text()
    assert "decode faster than full attention" in (tmp_path / "README.md").read_text()


def _run(delay_ms, quality, mean_ms=30.0):
    return {
        "repeat_delay": delay_ms / 1e3,
        "repeat_quality": quality,
        "mean_delay": mean_ms / 1e3,
        "quality": quality,
    }


def test_store_trace_comparison_names_every_baseline():
    from benchmarks.store import compare

    runs = {
        "lru": _run(19.0, 1.0, 47.0),
        "kivi2-lru": _run(1.5, 0.90, 32.0),
        "streaming-lru": _run(0.5, 0.70, 31.0),
        "adaptive a=1": _run(0.2, 0.80, 30.0),
        "adaptive a=2": _run(1.0, 0.95, 30.5),
        "adaptive a=3": _run(6.0, 0.99, 33.0),
    }
    rows = {metric: (value, target) for metric, value, target in compare(runs)}
    # kivi2: adaptive at quality 0.90 lies 2/3 of the way from (0.80, 0.2) to (0.95, 1.0).
    at = 0.2 + (1.0 - 0.2) * (0.90 - 0.80) / (0.95 - 0.80)
    assert rows["kivi2-lru: loading delay / adaptive's at equal quality"] == (
        f"{1.5 / at:.2f}",
        ">= 1.4",
    )
    # streaming: below the curve, bounded by the fastest adaptive point.
    value, target = rows["streaming-lru: loading delay / adaptive's at equal quality"]
    assert value.startswith(f"{0.5 / 0.2:.2f} at least") and target == ">= 1.4"
    # lru: above the curve's top quality, named rather than dropped.
    assert rows["lru: loading delay / adaptive's at equal quality"][0].startswith("n/a: quality")
    best, target = rows["best static baseline, loading delay at equal quality"]
    assert best == f"kivi2-lru: {1.5 / at:.2f}x; not comparable: lru"
    assert report.verdict(best, target) == "holds"
    # Quality at equal delay: kivi2 at 1.5 ms -> between (1.0, 0.95) and (6.0, 0.99).
    gain = 0.95 + 0.04 * (1.5 - 1.0) / 5.0 - 0.90
    value, _ = rows["kivi2-lru: adaptive quality - baseline's at equal loading delay"]
    assert value.startswith(f"{gain:+.4f}")
    best, _ = rows["best static baseline, quality gain at equal loading delay"]
    assert best.startswith("kivi2-lru: ") and "not comparable: lru" in best
