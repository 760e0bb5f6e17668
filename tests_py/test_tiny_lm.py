"""The shipped tiny LM: loads offline, retrieves pass-keys as the README states, its
training script runs, and ``kvpack demo`` runs end to end on it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvpack import hf  # noqa: E402
from kvpack.eval import scoring, tasks  # noqa: E402
from kvpack.models import TINY_LM_DIR, load_tiny_lm, training_record  # noqa: E402
from kvpack.models.byte_tokenizer import BOS, VOCAB_SIZE, decode  # noqa: E402

README = (Path(__file__).parents[1] / "README.md").read_text()


def _readme_number(pattern: str) -> float:
    match = re.search(pattern, README)
    assert match, f"README states no {pattern!r}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def model():
    return load_tiny_lm()


def test_weights_are_small_and_load_offline(model):
    assert (TINY_LM_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    assert model.config.max_position_embeddings >= 2048
    assert model.config.vocab_size == VOCAB_SIZE
    code = "from kvpack.models import load_tiny_lm; load_tiny_lm()"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_passkey_accuracy_with_full_cache_is_what_the_readme_says(model):
    stated = _readme_number(
        r"full cache retrieves ([0-9.]+)%\s+of\s+the\s+10\s+fixed\s+pass-key\s+prompts"
    )
    accuracy = scoring.passkey_accuracy(model, context=2048, prompts=10, batch=5, seed=0)
    assert 100 * accuracy == stated


def test_held_out_perplexity_is_what_the_readme_says(model):
    stated = _readme_number(r"held-out\s+perplexity\s+of\s+([0-9.]+)\s+per\s+byte")
    assert scoring.perplexity(model, windows=4, seed=0) == pytest.approx(stated, abs=0.01)


def _byte_windows(seed, context, windows):
    """The held-out windows scoring.perplexity scores: BOS, then context - 1 bytes."""
    held_out = tasks.corpus().held_out
    starts = np.random.default_rng(seed).integers(0, held_out.size - context, size=windows)
    return [
        torch.tensor([[BOS, *held_out[start : start + context - 1].tolist()]]) for start in starts
    ]


def _window_losses(model, ids, split):
    """Per-token loss of ids[split:] from one plain forward (float64)."""
    with torch.no_grad():
        logits = model(ids).logits[0, split - 1 : -1].double()
    return torch.nn.functional.cross_entropy(logits, ids[0, split:], reduction="none").numpy()


@pytest.mark.parametrize("method", ["full", "clusterkv", "kivi"])
def test_perplexity_of_an_uncompressed_cache_is_one_forward(model, method):
    """Prefill then a 511-token decode chunk through kvpack's layers equals one forward
    (and the reference of "full", transformers' DynamicCache)."""
    context, windows = 1024, 2
    reference = scoring.perplexity(model, context=context, windows=windows, seed=3)
    budget = 1.0 if method == "full" else 4096
    ours = scoring.perplexity(
        model, method, budget, context=context, windows=windows, seed=3, reference="kvpack"
    )
    assert ours == pytest.approx(reference, rel=1e-4)
    split = round(0.75 * context)
    losses = [_window_losses(model, ids, split) for ids in _byte_windows(3, context, windows)]
    assert reference == pytest.approx(np.exp(np.concatenate(losses).mean()), rel=1e-4)


def _compressed_perplexity(model, method, budget, windows, split):
    """Perplexity with the method's own prefill of each window's prompt (no sharing)."""
    losses = []
    for ids in windows:
        cache = {hf.cache_argument(model): hf.make_cache(model, method, budget)}
        with torch.no_grad():
            first = model(ids[:, :split], **cache).logits[:, -1:]
            rest = model(ids[:, split:-1], **cache).logits
        logits = torch.cat([first, rest], dim=1)[0].double()
        losses.append(torch.nn.functional.cross_entropy(logits, ids[0, split:], reduction="none"))
    return float(np.exp(torch.cat(losses).mean().item()))


def test_runs_share_a_prefill_and_score_as_their_own(model):
    context, windows = 512, 2
    runs = [("full", 1.0), ("h2o", 0.25), ("kvmerger", 0.5), ("clusterkv", 64), ("kivi", 32)]
    values = scoring.perplexity(model, context=context, windows=windows, seed=5, runs=runs)
    split = round(0.75 * context)
    texts = _byte_windows(5, context, windows)
    losses = [_window_losses(model, ids, split) for ids in texts]
    assert values[0] == pytest.approx(np.exp(np.concatenate(losses).mean()), rel=1e-4)
    for (method, budget), value in zip(runs[1:], values[1:]):
        expected = _compressed_perplexity(model, method, budget, texts, split)
        assert value == pytest.approx(expected, rel=1e-4), method
    assert len(set(values)) == len(values)  # the runs differ
    single = scoring.perplexity(model, "h2o", 0.25, context=context, windows=windows, seed=5)
    assert single == values[1]
    accuracies = scoring.passkey_accuracy(
        model, context=512, prompts=4, batch=2, runs=[("full", 1.0), ("streaming_llm", 32)]
    )
    assert accuracies[0] == scoring.passkey_accuracy(model, context=512, prompts=4, batch=2)
    assert accuracies[1] == scoring.passkey_accuracy(
        model, "streaming_llm", 32, context=512, prompts=4, batch=2
    )
    # A run's own make_cache options, over the measure's: as if given to the measure.
    pyramid = {"layer_budgets": "pyramid"}
    window = dict(context=context, windows=1, seed=5)
    mixed = scoring.perplexity(model, runs=[("h2o", 64, pyramid), ("h2o", 64)], **window)
    assert mixed == [
        scoring.perplexity(model, "h2o", 64, options=o, **window) for o in (pyramid, None)
    ]
    assert mixed[0] != mixed[1]  # the schedule was applied
    for bad in ([], [("h2o",)], ["h2o"], [("h2o", 64, "pyramid")]):
        with pytest.raises(ValueError, match="runs: expected a non-empty sequence"):
            scoring.perplexity(model, context=context, windows=1, runs=bad)


def test_context_dependent_tokens_are_those_the_distant_prompt_predicts(model):
    """Against plain forwards: a token counts when the whole prompt lowers its loss by
    >= 2 nats below the prompt's last 128 tokens and predicts it with loss <= 2."""
    context, windows, short = 1024, 3, 128
    masks = scoring.context_dependent_tokens(
        model, context=context, windows=windows, seed=5, short=short
    )
    split = round(0.75 * context)
    for ids, mask in zip(_byte_windows(5, context, windows), masks):
        full = _window_losses(model, ids, split)
        cut = torch.cat([ids[:, :1], ids[:, split - short :]], dim=1)
        near = _window_losses(model, cut, short + 1)
        gain = near - full
        expected = (gain >= 2.0) & (full <= 2.0)
        borderline = (np.abs(gain - 2.0) < 1e-3) | (np.abs(full - 2.0) < 1e-3)
        assert mask.shape == (context - split,)
        np.testing.assert_array_equal(mask[~borderline], expected[~borderline])
    assert sum(int(m.sum()) for m in masks) > 0


def test_perplexity_of_context_dependent_tokens_scores_the_selected_tokens(model):
    context, windows = 1024, 4
    masks = scoring.context_dependent_tokens(model, context=context, windows=windows, seed=2)
    full = scoring.perplexity(model, context=context, windows=windows, seed=2, scored=masks)
    split = round(0.75 * context)
    losses = [
        _window_losses(model, ids, split)[mask]
        for ids, mask in zip(_byte_windows(2, context, windows), masks)
    ]
    assert full == pytest.approx(np.exp(np.concatenate(losses).mean()), rel=1e-4)
    # A window that drops the distant prompt loses on these tokens far more than on the
    # average token: the metric sees what compression removes.
    kept = 0.25
    window_all = scoring.perplexity(
        model, "streaming_llm", kept, context=context, windows=windows, seed=2
    )
    window_long = scoring.perplexity(
        model, "streaming_llm", kept, context=context, windows=windows, seed=2, scored=masks
    )
    every = scoring.perplexity(model, context=context, windows=windows, seed=2)
    assert window_long / full > 1.5 * (window_all / every)


def test_perplexity_rejects_bad_selections_of_scored_tokens(model):
    masks = scoring.context_dependent_tokens(model, context=512, windows=1, seed=0)
    with pytest.raises(ValueError, match="scored: expected 2 boolean masks of 128 tokens"):
        scoring.perplexity(model, context=512, windows=2, scored=masks)
    as_integers = [masks[0].astype(np.int64)]  # would index tokens 0 and 1, not select
    with pytest.raises(ValueError, match="scored: expected 1 boolean masks"):
        scoring.perplexity(model, context=512, windows=1, scored=as_integers)
    none = [np.zeros_like(masks[0])]
    with pytest.raises(ValueError, match="scored: selects no token"):
        scoring.perplexity(model, context=512, windows=1, scored=none)
    with pytest.raises(ValueError, match=r"short: expected 1\.\.382 prompt tokens, got 400"):
        scoring.context_dependent_tokens(model, context=512, windows=1, short=400)
    with pytest.raises(ValueError, match="gain: expected a number of nats, got NaN"):
        scoring.context_dependent_tokens(model, context=512, windows=1, gain=float("nan"))
    with pytest.raises(TypeError, match="tokenizer: expected a transformers tokenizer"):
        scoring.perplexity(model, context=512, windows=1, tokenizer="gpt2")
    with pytest.raises(ValueError, match="reference: expected 'transformers' or 'kvpack'"):
        scoring.perplexity(model, context=512, windows=1, reference="dynamic")


def test_training_record_describes_the_weights():
    record = training_record()
    stages = [*record["earlier_stages"], record]
    assert stages[0]["settings"]["seed"] == 0 and stages[0]["settings"].get("init") is None
    assert all(stage["settings"].get("init") for stage in stages[1:])
    assert record["parameters"] == sum(p.numel() for p in load_tiny_lm().parameters())
    assert record["log"][-1]["length"] == load_tiny_lm().config.max_position_embeddings


def test_training_script_runs(tmp_path):
    from kvpack.eval import train_tiny_lm

    status = train_tiny_lm.main(
        ["--out", str(tmp_path), "--phases", "256:2:2,320:1:2", "--eval-every", "2"]
    )
    assert status == 0
    record = json.loads((tmp_path / "training.json").read_text())
    assert [entry["step"] for entry in record["log"]] == [2, 4]
    trained = load_tiny_lm(tmp_path)
    assert trained.config.max_position_embeddings == 320


def test_tasks_are_exact_length_and_answerable():
    rng = np.random.default_rng(0)
    ids, answer, key = tasks.passkey_sample(rng, 400)
    assert len(ids) == 400 and decode(ids[answer:]) == f" {key}."
    assert f"The pass key is {key}." in decode(ids[:answer])
    assert len(tasks.kv_lookup_sample(rng, 300)) == 300
    assert len(tasks.repeat_sample(rng, 300)) == 300
    with pytest.raises(ValueError, match="length"):
        tasks.passkey_sample(rng, 50)


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvpack",
            "demo",
            "--context",
            "512",
            "--prompts",
            "2",
            "--windows",
            "1",
            "--long-windows",
            "8",
            "--contexts",
            "4",
            "--requests",
            "12",
            "--speed-tokens",
            "4096",
            "--quiet",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()}
    # Context-dependent bytes are few at 512 tokens (5 in these windows), yet some.
    assert int(re.search(r"perplexity of the (\d+) bytes", result.stdout).group(1)) > 0
    for method in (
        "full",
        "clusterkv",
        "quest",
        "kvmerger",
        "h2o",
        "streaming_llm",
        "snapkv",
        "cam",
        "kivi",
    ):
        passkey, *perplexities = rows[method]
        assert 0 <= float(passkey.rstrip("%")) <= 100
        assert len(perplexities) == 4  # all bytes, then context-dependent bytes, at 50%, 35%
        assert all(1 < float(p) < 256 for p in perplexities[:2])
        assert all(1 < float(p) < 256 for p in perplexities[2:])
    policies = {
        line[:19].strip(): line[19:46].split()
        for line in lines
        if line.startswith(("lru ", "kivi2-lru ", "streaming-lru ", "adaptive a="))
    }
    assert len(policies) == 6
    for load, quality, mean in policies.values():
        assert float(mean) > 0 and float(load) >= 0 and 0 < float(quality) <= 1
    assert float(policies["lru"][1]) == 1.0  # lossless: quality 1
    for figure in ("passkey.png", "perplexity.png", "store_trace.png"):
        assert (tmp_path / figure).stat().st_size > 1000
