"""RULER-style tasks built with SmolLM2's tokenizer: exact lengths, needles where asked,
answers the prompt holds, RULER's string-match score; the eval CLI runs them."""

import re

import numpy as np
import pytest

from kvpack.eval import ruler
from kvpack.models import load_pretrained

NEEDLE_TASKS = ("passkey", "single_needle", "multikey", "multivalue", "variable_tracking")


@pytest.fixture(scope="module")
def tokenizer(smollm2_cache):
    return load_pretrained("smollm2-135m", cache_dir=smollm2_cache)[1]


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("length", [512, 2048])
def test_samples_have_the_length_and_hold_their_answers(tokenizer, task, length):
    sample = ruler.make_sample(task, tokenizer, length, np.random.default_rng(7), depth=0.3)
    if task in NEEDLE_TASKS:
        assert len(sample.prompt) == length
    else:  # word lists: the longest that fits
        assert length - 12 <= len(sample.prompt) <= length
    assert sample.prompt[0] == tokenizer.bos_token_id
    text = tokenizer.decode(sample.prompt)
    for answer in sample.answers:
        assert answer in text
    # The question is the prompt's tail: the context before it holds every answer, and
    # the question mentions none of what a needle task hides.
    question = tokenizer.decode(sample.prompt[-sample.question :])
    assert 8 <= sample.question < length // 8
    assert question.lstrip("\n").startswith(("What", "Question"))
    context = tokenizer.decode(sample.prompt[: -sample.question])
    assert all(answer in context for answer in sample.answers)
    if task == "multikey":  # the value asked for is the asked key's, among distractors
        key = re.search(r"magic number for (\w+) mentioned", text).group(1)
        assert f"numbers for {key} is: {sample.answers[0]}." in text
        assert len(re.findall(r"special magic numbers for \w+ is:", text)) == 4
    if task == "common_words":  # the ten answers are the ten most frequent list items
        items = re.findall(r"^\d+\. (\w+)$", text, flags=re.MULTILINE)
        words, counts = np.unique(items, return_counts=True)
        assert set(words[np.argsort(-counts, kind="stable")][:10]) == set(sample.answers)
    if task == "frequent_words":
        items = re.findall(r"^\d+\. (\w+)$", text, flags=re.MULTILINE)
        words, counts = np.unique(items, return_counts=True)
        assert list(words[np.argsort(-counts, kind="stable")][:3]) == sample.answers


def test_needle_depth_and_determinism(tokenizer):
    positions = []
    for depth in (0.0, 0.5, 1.0):
        rng = np.random.default_rng(1)
        sample = ruler.make_sample("single_needle", tokenizer, 1024, rng, depth)
        positions.append(sample.text.index(sample.answers[0]) / len(sample.text))
    assert positions[0] < 0.15 and 0.35 < positions[1] < 0.65 and positions[2] > 0.85
    a = ruler.make_sample("multivalue", tokenizer, 700, np.random.default_rng(3))
    b = ruler.make_sample("multivalue", tokenizer, 700, np.random.default_rng(3))
    assert a.prompt == b.prompt and a.answers == b.answers


def test_string_match_score_and_bad_input(tokenizer):
    assert ruler.score(" 1234567 and 7654321", ["1234567", "7654321"]) == 1.0
    assert ruler.score("ABCDE, fghij", ["abcde", "FGHIJ", "zzzzz", "yyyyy"]) == 0.5
    assert ruler.score("nothing", ["1234567"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        ruler.score("x", [])
    with pytest.raises(ValueError, match="task: expected one of"):
        ruler.make_sample("qa", tokenizer, 512, np.random.default_rng(0))
    with pytest.raises(ValueError, match="depth"):
        ruler.make_sample("passkey", tokenizer, 512, np.random.default_rng(0), depth=1.5)
    with pytest.raises(ValueError, match="length"):
        ruler.make_sample("passkey", tokenizer, 40, np.random.default_rng(0))


def test_eval_cli_ruler_on_smollm2(smollm2_cache, monkeypatch, capsys, tmp_path):
    import json

    from kvpack.cli import main

    monkeypatch.setenv("KVPACK_CACHE", str(smollm2_cache))
    out = tmp_path / "ruler.json"
    argv = ["eval", "--model", "smollm2-135m", "--task", "ruler", "--methods", "full"]
    argv += ["--budgets", "0.5", "--prompts", "1", "--context", "320", "--quiet"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RULER-style task average" in printed and "per task" in printed
    results = json.loads(out.read_text())
    assert [r["method"] for r in results] == ["full"]
    for r in results:
        assert set(r["tasks"]) == {*ruler.TASKS, "average", "prompts"}
        assert r["value"] == pytest.approx(np.mean([r["tasks"][t] for t in ruler.TASKS]))
        prompts = r["tasks"]["prompts"]  # each prompt's score, their mean the task's
        assert all(r["tasks"][t] == pytest.approx(np.mean(prompts[t])) for t in ruler.TASKS)
    assert results[0]["tasks"]["passkey"] == 1.0  # the full cache finds a shallow pass key
    assert main(["eval", "--model", "tiny", "--task", "ruler"]) == 2
    assert "subword tokenizer" in capsys.readouterr().err


def test_bootstrap_interval_against_the_normal_approximation():
    from kvpack.eval import bootstrap_interval

    rng = np.random.default_rng(3)
    scores = {t: rng.integers(0, 2, size=40).astype(float).tolist() for t in ("a", "b", "c")}
    low, high = bootstrap_interval(scores, seed=1)
    # Float64 reference: the stratified mean's normal interval, each task's variance of
    # its mean (population variance / n, as the bootstrap resamples) over tasks squared.
    means = [np.mean(v) for v in scores.values()]
    variance = sum(np.var(v) / len(v) for v in scores.values()) / len(scores) ** 2
    half = 1.959964 * np.sqrt(variance)
    assert low < np.mean(means) < high
    assert low == pytest.approx(np.mean(means) - half, abs=0.012)
    assert high == pytest.approx(np.mean(means) + half, abs=0.012)
    # Paired: a run against itself differs by exactly 0; shifted by 0.25, by 0.25.
    assert bootstrap_interval(scores, scores) == (0.0, 0.0)
    shifted = {t: [x + 0.25 for x in v] for t, v in scores.items()}
    assert bootstrap_interval(shifted, scores) == pytest.approx((0.25, 0.25))
    # More prompts, a narrower interval (about 1/sqrt(4) as wide).
    more = {t: v * 4 for t, v in scores.items()}
    narrow = bootstrap_interval(more, seed=1)
    assert (narrow[1] - narrow[0]) == pytest.approx((high - low) / 2, rel=0.15)
    with pytest.raises(ValueError, match="baseline: expected the same tasks"):
        bootstrap_interval(scores, {"a": [1.0]})
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(scores, confidence=1.5)
    with pytest.raises(ValueError, match="scores: expected a dict"):
        bootstrap_interval({})
