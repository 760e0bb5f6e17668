"""RESULTS.md, rendered from the latest run of every suite.

Each suite run leaves one record, ``results/<suite>.json`` (title, command, machine,
date, rows of metric / value / target); ``python -m benchmarks --report`` renders every
record into RESULTS.md, headed by the papers' claims and the issues' targets with a
verdict each, so the file always says what the commands last printed.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from .common import machine

HERE = Path(__file__).parent
RECORDS = HERE / "results"
RESULTS = HERE / "RESULTS.md"
README = HERE.parent / "README.md"
# The README shows the claims table between these lines, rewritten by every render.
README_START, README_END = "<!-- claims: start -->", "<!-- claims: end -->"

# (system, the paper's claim, suite, metric it is checked by). The metric is matched as a
# prefix of the suite's row names; the first matching row gives value and verdict.
CLAIMS = [
    (
        "ClusterKV",
        "within 5 points of the full cache and above Quest at 1/16 of the prompt; here "
        "SmolLM2-135M on the RULER-style tasks at 4k",
        "real_lm_4k",
        "ClusterKV @ 1/16: points below full",
    ),
    (
        "ClusterKV",
        "the same at 1/8 of the prompt (SmolLM2-135M, RULER-style tasks at 4k)",
        "real_lm_4k",
        "ClusterKV @ 1/8: points below full",
    ),
    (
        "ClusterKV",
        "within 5 points of the full cache and above Quest at 1/16 of the prompt; here "
        "SmolLM2-135M on the RULER-style tasks at 2k",
        "real_lm",
        "ClusterKV @ 1/16: points below full",
    ),
    (
        "ClusterKV",
        "the same at 1/8 of the prompt (SmolLM2-135M, RULER-style tasks at 2k)",
        "real_lm",
        "ClusterKV @ 1/8: points below full",
    ),
    (
        "ClusterKV",
        "negligible accuracy loss at a small budget (1k-2k of 32k tokens)",
        "tiny_lm",
        "pass-key at 2048, clusterkv @ 128, first 2 layers",
    ),
    (
        "ClusterKV",
        "more accurate than page-level recall (Quest); checked here as at least as accurate",
        "tiny_lm",
        "pass-key at 2048, clusterkv @ 128, first 2 layers",
    ),
    (
        "ClusterKV",
        "decode faster than full attention (up to 2x end to end)",
        "clusterkv",
        "dense / clusterkv step",
    ),
    (
        "ClusterKV",
        "up to 2x faster decoding end to end; here generate() on SmolLM2 at 1/16 of 8k tokens",
        "e2e",
        "8160: clusterkv @ 1/16: SDPA decode / its decode",
    ),
    (
        "ClusterKV",
        "cached clusters make most recalled tokens hits",
        "tiny_lm_hit_rate",
        "ClusterKV hit rate",
    ),
    (
        "KVMerger",
        "lower loss than H2O and CaM at a 50% budget; here SmolLM2-135M's perplexity",
        "real_lm",
        "perplexity per token, kvmerger @ 50%",
    ),
    (
        "KVMerger",
        "the same on SmolLM2's tokens that need the distant prompt, 50%",
        "real_lm",
        "context-dependent perplexity, kvmerger @ 50%",
    ),
    (
        "KVMerger",
        "lower loss than H2O and CaM at a 35% budget; here SmolLM2-135M's perplexity",
        "real_lm",
        "perplexity per token, kvmerger @ 35%",
    ),
    (
        "KVMerger",
        "the same on SmolLM2's tokens that need the distant prompt, 35%",
        "real_lm",
        "context-dependent perplexity, kvmerger @ 35%",
    ),
    (
        "KVMerger",
        "better task accuracy than H2O and CaM at 50% (SmolLM2, RULER-style tasks at 2k)",
        "real_lm",
        "KVMerger @ 50%: task average",
    ),
    (
        "KVMerger",
        "lower loss than H2O and CaM at a 50% budget",
        "tiny_lm_merging",
        "held-out perplexity per byte, kvmerger @ 50%, first 2 layers",
    ),
    (
        "KVMerger",
        "lower loss than H2O and CaM at a 50% budget, on the bytes that need the prompt",
        "tiny_lm_merging",
        "context-dependent perplexity, kvmerger @ 50%, first 2 layers",
    ),
    (
        "KVMerger",
        "lower loss than H2O and CaM at a 35% budget",
        "tiny_lm_merging",
        "held-out perplexity per byte, kvmerger @ 35%, first 2 layers",
    ),
    (
        "KVMerger",
        "lower loss than H2O and CaM at a 35% budget, on the bytes that need the prompt",
        "tiny_lm_merging",
        "context-dependent perplexity, kvmerger @ 35%, first 2 layers",
    ),
    (
        "KVMerger",
        "better needle (pass-key) retrieval than H2O and CaM at a 50% budget",
        "tiny_lm_merging",
        "pass-key at 2048, kvmerger @ 50%",
    ),
    (
        "KVMerger",
        "lower attention error than H2O and CaM on real keys (MiniLM), 50%",
        "merging_quality",
        "MiniLM attention error, kvmerger at 50%",
    ),
    (
        "AdaptCache",
        "1.43-2.4x lower loading delay than static baselines at equal quality; here "
        "SmolLM2's caches, quality the task score of the answer decoded from the entry",
        "real_lm",
        "best static baseline, loading delay",
    ),
    (
        "AdaptCache",
        "higher quality than static baselines at equal delay (SmolLM2's caches, task score)",
        "real_lm",
        "best static baseline, quality",
    ),
    (
        "AdaptCache",
        "1.43-2.4x lower loading delay than static baselines at equal quality",
        "store_trace",
        "best static baseline, loading delay",
    ),
    (
        "AdaptCache",
        "higher quality than static baselines at equal delay",
        "store_trace",
        "best static baseline, quality",
    ),
]


def record(
    name: str,
    title: str,
    command: str,
    rows: list[tuple[str, str, str]],
    records: Path | None = None,
) -> Path:
    """Saves one suite's run as ``<records>/<name>.json`` (default results/), replacing
    the previous run."""
    records = records or RECORDS
    records.mkdir(exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = {
        "title": title,
        "command": command,
        "machine": machine(),
        "date": now,
        "rows": [list(row) for row in rows],
    }
    path = records / f"{name}.json"
    path.write_text(json.dumps(entry, indent=1) + "\n")
    return path


def load_records(order: list[str], records: Path | None = None) -> dict[str, dict]:
    """Every saved record, the suites in ``order`` first, then any others by name."""
    records = records or RECORDS
    found = {path.stem: path for path in records.glob("*.json")} if records.is_dir() else {}
    names = [n for n in order if n in found] + sorted(set(found) - set(order))
    return {name: json.loads(found[name].read_text()) for name in names}


_NUMBER = r"([-+]?\d+(?:\.\d+)?)"


def verdict(value: str, target: str) -> str:
    """ "holds", "does not hold" or "" (nothing to check) for one row.

    A target either states its own verdict ("...: holds") or is a bound such as
    ``>= 1.4``, ``<= 4x memcpy`` or ``>= 2 GB/s``: the value's number with the bound's
    unit (its leading number when the bound has none) is compared with it.
    """
    if target.endswith(": does not hold") or ": does not hold " in target:
        return "does not hold"
    if target.endswith(": holds") or ": holds " in target:
        return "holds"
    bound = re.fullmatch(rf"\s*(>=|<=|>|<)\s*{_NUMBER}\s*(.*?)\s*", target)
    if not bound:
        return ""
    op, limit, unit = bound.group(1), float(bound.group(2)), bound.group(3)
    if unit:
        found = re.search(rf"{_NUMBER}\s*{re.escape(unit)}", value)
    else:  # the value's own number, after an optional "name: " label
        found = re.match(rf"\s*(?:[\w .=-]+:\s*)?{_NUMBER}", value)
    if not found:
        return "does not hold"  # no number where one was expected (e.g. "n/a")
    number = float(found.group(1))
    met = {
        ">=": number >= limit,
        "<=": number <= limit,
        ">": number > limit,
        "<": number < limit,
    }[op]
    return "holds" if met else "does not hold"


def _row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def claims_table(records: dict[str, dict]) -> list[str]:
    """The papers' claims, each with the row that checks it and its verdict."""
    lines = [
        _row(("system", "claim", "measured by", "value", "target", "verdict")),
        _row(("---",) * 6),
    ]
    for system, claim, suite, prefix in CLAIMS:
        rows = [r for r in records.get(suite, {}).get("rows", []) if r[0].startswith(prefix)]
        if not rows:
            lines.append(_row((system, claim, f"{suite}: {prefix}", "not run", "", "")))
            continue
        metric, value, target = rows[0]
        lines.append(
            _row((system, claim, f"{suite}: {metric}", value, target, verdict(value, target)))
        )
    return lines


def with_claims(readme: str, table: list[str]) -> str:
    """``readme`` with the lines between the claims markers replaced by ``table``."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        return readme
    return readme[: start + len(README_START)] + "\n" + "\n".join(table) + "\n" + readme[end:]


def render(
    order: list[str],
    records: Path | None = None,
    results: Path | None = RESULTS,
    readme: Path | None = README,
) -> str:
    """Renders the saved records (default results/) into ``results`` and the claims
    table into ``readme`` (each skipped when None); returns the RESULTS.md text."""
    records = load_records(order, records)
    claims = claims_table(records)
    lines = [
        "# kvpack results",
        "",
        "Rendered by `python -m benchmarks --report` from the latest run of each suite in",
        "benchmarks/results/; `python -m benchmarks --only NAME` re-runs one suite and",
        "renders again. Every number below comes from the run named in its section.",
        "",
        "## The papers' claims, checked here",
        "",
        *claims,
        "",
        "## Every target",
        "",
        _row(("suite", "metric", "value", "target", "verdict")),
        _row(("---",) * 5),
    ]
    for name, entry in records.items():
        for metric, value, target in entry["rows"]:
            mark = verdict(value, target)
            if mark:
                lines.append(_row((name, metric, value, target, mark)))
    for name, entry in records.items():
        lines += [
            "",
            f"## {entry['title']}",
            "",
            f"- suite: `{name}`",
            f"- command: `{entry['command']}`",
            f"- machine: {entry['machine']}",
            f"- date: {entry['date']}",
            "",
            _row(("metric", "value", "target")),
            _row(("---",) * 3),
            *[_row(row) for row in entry["rows"]],
        ]
    text = "\n".join(lines) + "\n"
    if results is not None:
        results.write_text(text)
    if readme is not None and readme.exists():
        readme.write_text(with_claims(readme.read_text(), claims))
    return text
