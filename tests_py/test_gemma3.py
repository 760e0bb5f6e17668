"""Gemma 3 270M from its PyPI wheels: a hybrid model (five sliding-window layers to each
global one, 1 KV head of 256) through kvpack.hf at 4096 tokens, against transformers'
own cache with SDPA on the same prompt."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
hf = pytest.importorskip("kvpack.hf")

from transformers import DynamicCache  # noqa: E402

from kvpack.models import load_pretrained  # noqa: E402

PROMPT, NEW = 4096, 6


@pytest.fixture(scope="module")
def gemma():
    try:
        model, tokenizer = load_pretrained("gemma3-270m")  # converted once into the cache
    except ImportError as error:  # MissingExtra: the wheels scripts/setup.sh installs
        pytest.skip(str(error))
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt(gemma):
    """4096 tokens of English prose (the Python documentation's text, repeated)."""
    import pydoc

    _, tokenizer = gemma
    text = " ".join(pydoc.render_doc(obj, renderer=pydoc.plaintext) for obj in (dict, str, list))
    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] < PROMPT:
        ids = torch.cat([ids, ids[:, 1:]], dim=1)
    return ids[:, :PROMPT]


@pytest.fixture(scope="module")
def expected(gemma, prompt):
    model, _ = gemma
    return generate(model, prompt, DynamicCache(config=model.config))


def generate(model, ids, cache, new=NEW):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **{hf.cache_argument(model): cache},
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )


def test_the_model_is_hybrid(gemma):
    config = gemma[0].config
    kinds = config.layer_types
    assert len(kinds) == 18 and config.num_key_value_heads == 1 and config.head_dim == 256
    assert [i for i, kind in enumerate(kinds) if kind == "full_attention"] == [5, 11, 17]
    assert config.sliding_window == 512


def test_every_method_generates_transformers_tokens_at_4k(gemma, prompt, expected):
    """A budget over the context: kvpack's own prefill (full) and every method from one
    shared exact prefill generate what DynamicCache + SDPA does."""
    model, _ = gemma
    cache = hf.make_cache(model, "full", 1.0)
    assert torch.equal(generate(model, prompt, cache), expected)
    assert cache.stats()["compressed_layers"] == [5, 11, 17]
    shared = hf.prefill(model, prompt)
    assert torch.equal(shared.next_ids, expected[:, : PROMPT + 1])
    for method in hf.METHODS:
        cache = hf.make_cache(model, method, 2 * PROMPT, prefill=shared)
        assert torch.equal(generate(model, shared.next_ids, cache, NEW - 1), expected), method


def test_compressed_forward_loop_equals_generate(gemma, prompt):
    """ClusterKV at 1/16 of a 1024-token prompt in the global layers, sliding layers at
    their window: a plain loop of forward calls picks generate()'s tokens and holds the
    same."""
    model, _ = gemma
    prompt = prompt[:, :1024]
    budget = 1024 // 16
    cache = hf.make_cache(model, "clusterkv", budget)
    produced = generate(model, prompt, cache)
    loop = hf.make_cache(model, "clusterkv", budget)
    ids, tokens = prompt, []
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(ids, **{hf.cache_argument(model): loop}, use_cache=True).logits[:, -1]
            ids = logits.argmax(-1, keepdim=True)
            tokens.append(ids)
    assert torch.equal(torch.cat([prompt, *tokens], dim=1), produced)
    stats, looped = cache.stats(), loop.stats()
    assert (
        stats["sliding_layers"]
        == looped["sliding_layers"]
        == [i for i in range(18) if i not in (5, 11, 17)]
    )
    for index in stats["sliding_layers"]:  # a window's worth of the latest tokens
        assert cache.layers[index].length == loop.layers[index].length <= 512 + 32
