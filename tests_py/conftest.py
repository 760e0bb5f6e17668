import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 tests skip without ml_dtypes
    BFLOAT16 = None

KV_DTYPES = [
    np.dtype(np.float32),
    np.dtype(np.float16),
    pytest.param(BFLOAT16, marks=pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")),
]


def tiny_decoder(family="llama", vocab_size=128, layers=4, **config):
    """A seeded random-weight decoder of transformers' ``family`` small enough for unit
    tests: hidden 64, 4 query and 2 KV heads, 512 positions (``config`` overrides)."""
    import torch
    import transformers

    prefix = {
        "llama": "Llama",
        "qwen2": "Qwen2",
        "qwen3": "Qwen3",
        "mistral": "Mistral",
        "phi3": "Phi3",
        "gemma2": "Gemma2",
        "gemma3": "Gemma3Text",
        "gpt_oss": "GptOss",
    }[family]
    torch.manual_seed(0)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    settings.update(config)
    config_object = getattr(transformers, prefix + "Config")(**settings)
    model_class = getattr(transformers, prefix.removesuffix("Text") + "ForCausalLM")
    return model_class(config_object).eval()


def padded_prompts():
    """Two prompts of 120 random tokens for a tiny decoder, the second left-padded by 40
    (token 0 is the pad token): (input ids, attention mask)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 120), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :40], mask[1, :40] = 0, 0
    return ids, mask


def generate(model, ids, mask, cache, new=10):
    """``new`` greedy tokens of ``model.generate`` from ``cache`` (any transformers Cache)."""
    import torch

    from kvpack import hf

    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            **{hf.cache_argument(model): cache},
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_cache(rng, heads_kv, tokens, dim, dtype, heads_q=None):
    """Standard-normal keys and values stored in `dtype`, and a float32 query."""
    keys = rng.standard_normal((heads_kv, tokens, dim), dtype=np.float32).astype(dtype)
    values = rng.standard_normal((heads_kv, tokens, dim), dtype=np.float32).astype(dtype)
    q = rng.standard_normal((heads_q or heads_kv, dim), dtype=np.float32)
    return q, keys, values


def random_indices(rng, rows, tokens, count):
    return np.ascontiguousarray(
        np.stack([np.sort(rng.choice(tokens, size=count, replace=False)) for _ in range(rows)]),
        dtype=np.int32,
    )


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A cache folder holding SmolLM2-135M converted once for the whole session."""
    from kvpack.models import load_pretrained

    root = tmp_path_factory.mktemp("kvpack-cache")
    load_pretrained("smollm2-135m", cache_dir=root)
    return root
