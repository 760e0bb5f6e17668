"""kvpack.hf: every method as a transformers Cache on a tiny random-weight Llama."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import kvpack

import reference
from conftest import generate, padded_prompts, tiny_decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("kvpack.hf")

from transformers import DynamicCache  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

HEAD_DIM = 16


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(head_dim=HEAD_DIM)


@pytest.fixture(scope="module")
def prompts():
    return padded_prompts()


@pytest.mark.parametrize("skip_layers", [0, 2])
@pytest.mark.parametrize("method", hf.METHODS)
def test_budget_over_context_gives_the_dynamic_cache_tokens(model, prompts, method, skip_layers):
    ids, mask = prompts
    expected = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = hf.make_cache(model, method, budget=4096, skip_layers=skip_layers)
    assert torch.equal(generate(model, ids, mask, cache), expected)
    assert cache.get_seq_length() == ids.shape[1] + 9


@pytest.mark.parametrize("method", hf.METHODS)
def test_small_budget_generates_and_padding_takes_no_slot(model, prompts, method):
    ids, mask = prompts
    cache = hf.make_cache(model, method, budget=32)
    batched = generate(model, ids, mask, cache)
    alone = generate(model, ids[1:, 40:], None, hf.make_cache(model, method, budget=32))
    assert torch.equal(batched[1, 40:], alone[0])
    assert cache.layers[0].get_seq_length() == ids.shape[1] + 9  # skipped: all of it
    layer = cache.layers[2]
    for row, real in enumerate((120, 80)):
        kind = kvpack.methods.REGISTRY[method].kind
        if kind == "compress":
            positions = layer.positions[row]
            held = positions[positions >= 0]
            # The budget (all for full), then each decoded token; never a padding position.
            kept = real if method == "full" else 32
            assert (positions >= 0).sum(-1).tolist() == [kept + 9] * 2
            assert held.min() >= 120 - real
        elif kind == "recall":
            assert layer.recall[row].tokens == real + 9
        else:
            assert layer.quantized[row].tokens == real


def test_forward_loop_equals_generate(model, prompts):
    ids, _ = prompts
    ids = ids[:1]
    ones = torch.ones_like(ids)
    expected = generate(model, ids, ones, hf.make_cache(model, "clusterkv", budget=48), new=6)
    cache = hf.make_cache(model, "clusterkv", budget=48)
    tokens = ids
    with torch.no_grad():
        logits = model(tokens, **{hf.cache_argument(model): cache}, use_cache=True).logits
        for _ in range(6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = model(nxt, **{hf.cache_argument(model): cache}, use_cache=True).logits
    assert torch.equal(tokens, expected)
    assert 0.0 <= cache.stats()["hit_rate"] <= 1.0


def _layer_step(model, method, budget, prompt=96, **options):
    """Prefill and one decode step of layer 2 through the public Cache API and the
    registered "kvpack" attention, handing both one keyword dict as a model's attention
    does; returns the inputs and the decode output."""
    cache = hf.make_cache(model, method, budget=budget, **options)
    module = model.model.layers[2].self_attn
    attend = ALL_ATTENTION_FUNCTIONS["kvpack"]
    g = torch.Generator().manual_seed(7)
    k, v = (torch.randn(1, 2, prompt + 1, HEAD_DIM, generator=g) for _ in range(2))
    q = torch.randn(1, 4, prompt + 1, HEAD_DIM, generator=g)
    scaling = HEAD_DIM**-0.5
    kwargs = {}
    keys, values = cache.update(k[:, :, :prompt], v[:, :, :prompt], 2, kwargs=kwargs)
    prefill, _ = attend(module, q[:, :, :prompt], keys, values, None, scaling=scaling, **kwargs)
    kwargs = {}
    keys, values = cache.update(k[:, :, prompt:], v[:, :, prompt:], 2, kwargs=kwargs)
    out, _ = attend(module, q[:, :, prompt:], keys, values, None, scaling=scaling, **kwargs)
    return cache, q[0].numpy(), k[0].numpy(), v[0].numpy(), prefill[0], out[0, 0].numpy()


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streaming_llm", "kvmerger"])
def test_eviction_layer_attends_the_compressed_slots(model, method):
    _cache, q, k, v, prefill, out = _layer_step(model, method, budget=24)
    prompt = k.shape[1] - 1
    scores = reference.accumulated_attention(q[:, :prompt], k[:, :prompt])
    kept = reference.compress(k[:, :prompt], v[:, :prompt], method, 24, scores=scores)
    keys = np.concatenate([kept["keys"], k[:, prompt:]], axis=1)
    values = np.concatenate([kept["values"], v[:, prompt:]], axis=1)
    expected, _, _ = reference.decode_attention(q[:, prompt], keys, values)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # The prefill itself is exact causal attention over the prompt.
    last, _, _ = reference.decode_attention(q[:, prompt - 1], k[:, :prompt], v[:, :prompt])
    np.testing.assert_allclose(prefill[-1].numpy(), last, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("refine", [1, 3])
@pytest.mark.parametrize("method", ["clusterkv", "quest"])
def test_recall_layer_attends_the_selected_tokens(model, method, refine):
    options = {"sink": 4, "n_clusters": 6} if method == "clusterkv" else {}
    cache, q, k, v, _, out = _layer_step(model, method, budget=32, refine=refine, **options)
    prompt = k.shape[1] - 1
    recall = cache.layers[2].recall[0]
    selected = recall.last_selection
    assert selected.shape[1] < prompt + 1
    if refine > 1:  # the budget kept from more candidates, by exact scores
        candidates = recall.last_candidates
        assert candidates.shape[1] > selected.shape[1]
        assert all(np.isin(s, c).all() for s, c in zip(selected, candidates, strict=True))
    expected, _, _ = reference.decode_attention(q[:, prompt], k, v, indices=selected)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("refine", [1, 2])
@pytest.mark.parametrize("method", ["clusterkv", "quest"])
def test_recall_layer_attends_the_coded_prompt(model, method, refine):
    # The prompt as 8-bit codes in the slow tier: the step attends what the float64
    # dequantized prompt and the exact decoded token give the selection.
    options = {"sink": 4, "n_clusters": 6} if method == "clusterkv" else {}
    cache, q, k, v, _, out = _layer_step(
        model, method, budget=32, slow_bits=8, slow_group=32, refine=refine, **options
    )
    prompt = k.shape[1] - 1
    deq_k, deq_v, quantized = reference.kivi_dequantize(
        k[:, :prompt], v[:, :prompt], 8, group=32, residual=32
    )
    assert quantized == 64
    keys = np.concatenate([deq_k, k[:, prompt:]], axis=1)
    values = np.concatenate([deq_v, v[:, prompt:]], axis=1)
    selected = cache.layers[2].recall[0].last_selection
    expected, _, _ = reference.decode_attention(q[:, prompt], keys, values, indices=selected)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    held = cache.stats()["bytes"]
    assert held["codes"] > 0


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
def test_refined_recall_over_the_context_gives_the_dynamic_cache_tokens(model, prompts, method):
    # Every candidate kept: the refined step's attention from its own scores is exact.
    ids, mask = prompts
    expected = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = hf.make_cache(model, method, budget=4096, refine=3)
    assert torch.equal(generate(model, ids, mask, cache), expected)
    assert cache.stats()["candidates"] == cache.stats()["selected"] > 0


def test_kivi_layer_attends_codes_and_decoded_tokens(model):
    _cache, q, k, v, _, out = _layer_step(model, "kivi", budget=16, bits=2)
    prompt = k.shape[1] - 1
    deq_k, deq_v, quantized = reference.kivi_dequantize(
        k[:, :prompt], v[:, :prompt], 2, residual=16
    )
    assert quantized == 64
    keys = np.concatenate([deq_k, k[:, prompt:]], axis=1)
    values = np.concatenate([deq_v, v[:, prompt:]], axis=1)
    expected, _, _ = reference.decode_attention(q[:, prompt], keys, values)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_a_method_object_configures_the_cache_like_its_name(model, prompts):
    ids, mask = prompts
    expected = generate(model, ids, mask, hf.make_cache(model, "snapkv", 32, window=4))
    cache = hf.make_cache(model, kvpack.methods.SnapKV(window=4), 32)
    assert torch.equal(generate(model, ids, mask, cache), expected)
    assert cache.method == kvpack.methods.SnapKV(window=4)
    assert cache.stats()["method"] == "snapkv"
    other = generate(model, ids, mask, hf.make_cache(model, "snapkv", 32, window=24))
    assert not torch.equal(other, expected)  # the window reaches the layers
    recall = hf.make_cache(model, kvpack.methods.Quest(page_size=8), 32)
    generate(model, ids, mask, recall, new=2)
    assert recall.layers[2].method == kvpack.methods.Quest(page_size=8)
    with pytest.raises(TypeError, match="log_count_bias: method 'quest' does not merge"):
        hf.make_cache(model, "quest", log_count_bias=True)


def test_bad_arguments_are_named(model):
    with pytest.raises(TypeError, match="sink: method 'h2o' does not take"):
        hf.make_cache(model, "h2o", sink=4)
    with pytest.raises(TypeError, match="bit: method 'kivi'"):
        hf.make_cache(model, "kivi", bit=4)
    assert hf.make_cache(model, "clusterkv", np.int64(64), sink=4).budget == 64
    assert hf.make_cache(model, "clusterkv").stats()["hit_rate"] == 0.0
    with pytest.raises(ValueError, match="method"):
        hf.make_cache(model, "bogus")
    with pytest.raises(ValueError, match="budget"):
        hf.make_cache(model, "h2o", budget=0)
    with pytest.raises(ValueError, match="budget"):
        hf.make_cache(model, "h2o", budget=1.5)
    with pytest.raises(TypeError, match="budget"):
        hf.make_cache(model, "h2o", budget="half")
    with pytest.raises(ValueError, match="skip_layers"):
        hf.make_cache(model, "h2o", skip_layers=9)


def test_checkpoint_kv_matches_a_plain_forward(model, tmp_path):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvpack.eval.data import checkpoint_kv

    model.save_pretrained(tmp_path)
    ids = list(range(3, 67))
    layers = checkpoint_kv(tmp_path, ids=ids)
    assert len(layers) == 4
    tensor = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    with torch.no_grad():
        hidden = model(tensor, output_hidden_states=True).hidden_states
        cos, sin = model.model.rotary_emb(hidden[0], positions)
        for i, got in enumerate(layers):
            block = model.model.layers[i]
            x = block.input_layernorm(hidden[i])
            attn = block.self_attn
            q = attn.q_proj(x).view(1, len(ids), 4, HEAD_DIM).transpose(1, 2)
            k = attn.k_proj(x).view(1, len(ids), 2, HEAD_DIM).transpose(1, 2)
            v = attn.v_proj(x).view(1, len(ids), 2, HEAD_DIM).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            assert got.queries.shape == (4, len(ids), HEAD_DIM)
            assert got.keys.shape == got.values.shape == (2, len(ids), HEAD_DIM)
            np.testing.assert_allclose(got.queries, q[0].numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.keys, k[0].numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.values, v[0].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="model"):
        checkpoint_kv(tmp_path / "missing", ids=ids)


def test_kvpack_threads_follow_torch_until_set():
    # One OpenMP runtime serves both in a process: kvpack's regions use torch's count
    # (and torch's workers) unless kvpack.set_num_threads chose one.
    script = (
        "import torch, kvpack\n"
        "torch.set_num_threads(1); a = kvpack.get_num_threads()\n"
        "torch.set_num_threads(2); b = kvpack.get_num_threads()\n"
        "kvpack.set_num_threads(3); torch.set_num_threads(1); c = kvpack.get_num_threads()\n"
        "print(a, b, c)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", "3"]


def test_share_budget_rounds_like_the_core(model):
    ids = torch.arange(1, 6)[None]  # 5 tokens: half of them is 3 slots, as kvpack.compress says
    cache = hf.make_cache(model, "streaming_llm", budget=0.5, skip_layers=0, sinks=1)
    with torch.no_grad():
        model(ids, **{hf.cache_argument(model): cache}, use_cache=True)
    assert cache.stats()["slots"] == [3] * 4


def test_stats_report_the_bytes_each_tier_holds(model, prompts):
    ids = prompts[0][:1]  # one sequence of 120 tokens; 2 KV heads of 16 per layer
    row = 2 * 2 * HEAD_DIM * 4  # K and V bytes of one token in one layer (float32)
    held = {}
    for method in ("h2o", "clusterkv", "kivi"):
        cache = hf.make_cache(model, method, budget=32)  # layers 0-1 skipped, 2-3 compressed
        with torch.no_grad():
            model(ids, **{hf.cache_argument(model): cache}, use_cache=True)
        held[method] = cache.stats()["bytes"]
        assert held[method]["total"] == sum(v for k, v in held[method].items() if k != "total")
    # After prefill an eviction cache holds the budget, and the skipped layers all of it.
    assert held["h2o"] == {
        "model": 2 * 120 * row + 2 * 32 * row,
        "total": 2 * 120 * row + 2 * 32 * row,
    }
    # Recall: the whole prompt in the slow tier (with room for the decoded window), no
    # fast-tier copies on the host.
    assert held["clusterkv"]["slow"] >= 2 * 120 * row and held["clusterkv"]["fast"] == 0
    # KIVI: codes for the prompt (2-bit, the latest 32 tokens in full precision).
    assert 2 * 32 * row < held["kivi"]["codes"] < 2 * 120 * row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layers_hand_host_tensors_to_the_core_without_a_copy(dtype):
    cache = torch.randn(1, 2, 40, HEAD_DIM).to(dtype)
    head = cache[0]  # C-contiguous: reaches the core through DLPack as it is
    assert kvpack._core._data_pointer(hf.cache._dense(head)) == head.data_ptr()
    assert hf.cache._host(cache[0, :, :10]).data_ptr() == cache.data_ptr()  # strided: a view


@pytest.mark.parametrize("method", hf.METHODS)
def test_caches_started_from_one_prefill_generate_as_their_own_prefill(model, prompts, method):
    ids, mask = prompts
    shared = hf.prefill(model, ids, mask)
    assert shared.tokens == ids.shape[1]
    for budget in (32, 4096):
        expected = generate(model, ids, mask, hf.make_cache(model, method, budget))
        cache = hf.make_cache(model, method, budget, prefill=shared)
        out = generate(model, shared.next_ids, shared.next_attention_mask, cache, new=9)
        assert torch.equal(out, expected)
    reference = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = hf.dynamic_cache(model, shared)
    out = generate(model, shared.next_ids, shared.next_attention_mask, cache, new=9)
    assert torch.equal(out, reference)


def test_a_prefill_is_checked(model, prompts):
    ids, mask = prompts
    with pytest.raises(TypeError, match="prefill: expected a kvpack"):
        hf.make_cache(model, "h2o", 32, prefill=(ids, mask))
    with pytest.raises(ValueError, match="input_ids: expected a"):
        hf.prefill(model, ids[0])


def _context_kv(model, ids):
    """The DynamicCache of a plain forward over ``ids`` (one row), per layer as NumPy."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{hf.cache_argument(model): cache})
    return [(layer.keys[0].numpy(), layer.values[0].numpy()) for layer in cache.layers]


def test_a_stored_context_goes_on_like_the_dynamic_cache(model, prompts):
    ids = prompts[0][:1]
    stored = kvpack.store.decode(kvpack.store.encode(_context_kv(model, ids[:, :100]), "none"))
    expected = generate(model, ids, torch.ones_like(ids), DynamicCache(config=model.config))
    cache = hf.stored_cache(model, stored)
    assert cache.get_seq_length() == 100
    got = generate(model, ids, torch.ones_like(ids), cache)
    assert torch.equal(got, expected)


def test_a_stored_entry_with_dropped_tokens_attends_only_what_it_kept(model, prompts):
    ids = prompts[0][:1]
    context, tail = ids[:, :100], ids[:, 100:]
    stored = kvpack.store.decode(
        kvpack.store.encode(_context_kv(model, context), "streaming_llm-0.5")
    )
    kept = stored.positions[0][0]
    assert all(np.array_equal(p, np.broadcast_to(kept, p.shape)) for p in stored.positions)
    assert len(kept) < 100
    # Reference: plain transformers over the whole context, the dropped tokens masked out
    # of the tail's attention with a 4D mask.
    allowed = torch.zeros(1, 1, tail.shape[1], ids.shape[1], dtype=torch.bool)
    allowed[..., torch.from_numpy(kept.astype(np.int64))] = True
    allowed[..., 100:] = torch.ones(tail.shape[1], tail.shape[1]).tril().bool()
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, use_cache=True, **{hf.cache_argument(model): full})
        expected = model(
            tail,
            attention_mask=torch.where(allowed, 0.0, -math.inf),
            position_ids=torch.arange(100, ids.shape[1])[None],
            **{hf.cache_argument(model): full},
        ).logits
        got = model(tail, **{hf.cache_argument(model): hf.stored_cache(model, stored, 100)}).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_stored_entry_is_checked(model, prompts):
    kv = _context_kv(model, prompts[0][:1, :50])
    with pytest.raises(ValueError, match="stored: expected 4 layers"):
        hf.stored_cache(model, kv[:3])
    with pytest.raises(ValueError, match="tokens: expected an int of at least 50"):
        hf.stored_cache(model, kv, 49)
    with pytest.raises(ValueError, match="log_count_bias: the stored entry has no merge counts"):
        hf.stored_cache(model, kv, log_count_bias=True)
    with pytest.raises(ValueError, match="stored: layer 1: expected keys and values of one"):
        hf.stored_cache(model, [kv[0], (kv[1][0], kv[1][1][:, :10]), *kv[2:]])
    with pytest.raises(ValueError, match="stored: layer 0: expected a \\(keys, values\\) pair"):
        hf.stored_cache(model, [kv[0][0], *kv[1:]])
    with pytest.raises(ValueError, match="stored: layer 0: expected keys and values of one"):
        hf.stored_cache(model, [(kv[0][0][0], kv[0][1][0]), *kv[1:]])  # 2-D
    with pytest.raises(ValueError, match="stored: layer 2 holds 10 tokens, layer 0 50"):
        hf.stored_cache(model, [*kv[:2], (kv[2][0][:, :10], kv[2][1][:, :10]), kv[3]])


def test_decode_budget_evicts_as_it_goes_and_attends_what_it_holds(model):
    # StreamingLLM keeps sinks + the latest tokens in every layer, so what each decode step
    # attended is known: plain transformers with those positions masked in must agree.
    ids = torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    prompt, held_max = 40, 0
    cache = hf.make_cache(
        model, "streaming_llm", budget=24, skip_layers=0, decode_budget=30, decode_interval=4
    )
    allowed = torch.ones(100, 100).tril().bool()
    logits = []
    with torch.no_grad():
        model(ids[:, :prompt], **{hf.cache_argument(model): cache})
        for t in range(prompt, 100):
            held = cache.layers[0].positions[0, 0]
            allowed[t] = False
            allowed[t, held] = True
            allowed[t, t] = True
            step = model(
                ids[:, t : t + 1],
                position_ids=torch.tensor([[t]]),
                **{hf.cache_argument(model): cache},
            )
            logits.append(step.logits[0, -1])
            held_max = max(held_max, max(layer.length for layer in cache.layers))
        expected = model(ids, attention_mask=torch.where(allowed, 0.0, -math.inf)[None, None])
    expected = expected.logits[0, prompt:]
    torch.testing.assert_close(torch.stack(logits), expected, rtol=1e-4, atol=1e-4)
    assert held_max <= 30 + 4
    last = cache.layers[0].positions[0, 0]
    assert last[:4].tolist() == [0, 1, 2, 3]  # the sinks stay
    assert last[-1].item() == 99 and cache.stats()["tokens"] == 100


@pytest.mark.parametrize(
    "method", ["h2o", "snapkv", "keydiff", "expected_attention", "cam", "kvmerger"]
)
def test_decode_budget_bounds_every_eviction_method(model, prompts, method):
    ids, mask = prompts
    cache = hf.make_cache(
        model, method, budget=24, decode_budget=32, decode_interval=8, log_count_bias=True
    )
    out = generate(model, ids, mask, cache, new=40)
    assert out.shape[1] == 160
    for layer in cache.layers[2:]:
        assert layer.length <= 32 + 8
        positions = layer.positions
        for row, real in enumerate((120, 80)):
            held = positions[row]
            assert (held[held >= 0] >= 120 - real).all()  # never a padding position
            # Every token held is counted once: merged slots carry the tokens they fold.
            if method == "kvmerger":
                counts = (layer.held_bias[row].exp() * (layer.held_positions[row] >= 0)).sum(-1) + (
                    layer.seen - layer.first_decoded
                )
                assert torch.allclose(counts, torch.tensor(float(real + 39)), rtol=1e-3)


def test_decode_budget_is_checked(model):
    for kwargs, message in [
        ({"method": "clusterkv", "decode_budget": 16}, "decode_budget: method 'clusterkv'"),
        ({"method": "full", "decode_budget": 16}, "decode_budget: method 'full'"),
        ({"method": "h2o", "decode_budget": 0}, "decode_budget: expected an int >= 1"),
        ({"method": "h2o", "decode_interval": 4}, "decode_interval: given without"),
    ]:
        with pytest.raises(ValueError, match=message):
            hf.make_cache(model, budget=16, **kwargs)


# Tiny random-weight members of each family, with what sets them apart: sliding-window
# layers (all of them, or interleaved with global ones), logit softcapping, attention sinks.
FAMILIES = {
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": 24},
    "phi3": {"sliding_window": 24, "pad_token_id": 0},
    "gemma2": {
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 24,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3": {
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 24,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "gpt_oss": {
        "head_dim": 16,
        "sliding_window": 24,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
}


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_every_kind_of_layer_applies_the_models_softcap_and_sinks(family):
    # Scores of order one, a softcap that bends them and sink logits that take a real
    # share of each softmax: a held, a recall and a KIVI step (a budget over the context)
    # give transformers' eager logits, which they would not with either rule dropped.
    options = dict(FAMILIES[family])
    if family == "gemma2":
        options["attn_logit_softcapping"] = 0.3
    model = tiny_decoder(family, layers=3, **options)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(6.0)
        for module in model.modules():
            if getattr(module, "sinks", None) is not None:
                module.sinks.copy_(torch.linspace(-1.0, 2.0, module.sinks.numel()))
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(6))

    def logits(cache):
        with torch.no_grad():
            out = model.generate(
                ids,
                **{hf.cache_argument(model): cache},
                max_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return torch.stack(out.logits)

    expected = logits(DynamicCache(config=model.config))
    adaptive = kvpack.methods.ClusterKVRefined(adaptive=True)
    for method in ("full", "clusterkv", "clusterkv_refined", adaptive, "quest", "kivi"):
        cache = hf.make_cache(model, method, budget=4096, skip_layers=0)
        got = logits(cache)
        assert cache.stats()["compressed_layers"] == [1]  # the global layer runs the method
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=method)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_like_its_dynamic_cache(family):
    # With a budget over the context every method generates transformers' own tokens
    # (eager attention, the reference for softcapping and sinks); sliding layers keep their
    # window.
    model = tiny_decoder(family, layers=3, **FAMILIES[family])
    config = model.config
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(5))
    model.set_attn_implementation("eager")
    expected = generate(model, ids, None, DynamicCache(config=config), new=12)
    for method in ("full", "h2o", "kvmerger", "clusterkv", "clusterkv_refined", "quest", "kivi"):
        cache = hf.make_cache(model, method, budget=4096, skip_layers=1)
        assert torch.equal(generate(model, ids, None, cache, new=12), expected), method
    window = FAMILIES[family].get("sliding_window")
    cache = hf.make_cache(model, "h2o", 16, skip_layers=0, decode_budget=20, decode_interval=4)
    generate(model, ids, None, cache, new=30)
    stats = cache.stats()
    assert len(stats["sliding_layers"]) + len(stats["compressed_layers"]) == 3
    for index in stats["compressed_layers"]:
        assert cache.layers[index].length <= 24
    for index in stats["sliding_layers"]:
        layer = cache.layers[index]
        held = layer.positions[0, 0]
        assert layer.length <= window - 1 + max(1, window // 16)
        # Everything a later query sees: the last window - 1 positions, as transformers keeps.
        assert set(range(layer.seen - window + 1, layer.seen)) <= set(held.tolist())
