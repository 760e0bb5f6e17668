"""What differs between transformers releases and model families, in one place: the
keyword a model takes its cache under, the name of the cache a forward returns, which
layers attend through a sliding window, and what a family adds to attention scores."""

from __future__ import annotations

import inspect

from transformers.cache_utils import Cache, get_layer_types_and_kwargs


def cache_argument(model) -> str:
    """The keyword under which ``model``'s forward (and so ``generate``) takes a cache:
    ``"cache"`` in current transformers, ``"past_key_values"`` in releases before the
    rename. Passing the other name warns (current) or is ignored (older)."""
    forward = getattr(model, "forward", None)
    if forward is None:
        raise TypeError(f"model: expected a transformers model, got {type(model).__name__}")
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output) -> Cache:
    """The cache a forward returned (``output.cache``, or ``past_key_values`` before the
    rename), read without the deprecation warning of the old name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def check_model(model) -> int:
    """The number of decoder layers of ``model``; TypeError when it is no transformers model."""
    if not hasattr(getattr(model, "config", None), "get_text_config"):
        raise TypeError(f"model: expected a transformers model, got {type(model).__name__}")
    return model.config.get_text_config().num_hidden_layers


def layer_windows(model) -> list[int | None]:
    """Per decoder layer, its sliding window in tokens (None: global attention), as
    transformers' own cache reads it; NotImplementedError naming any other kind of layer."""
    config = model.config.get_text_config()
    types, options = get_layer_types_and_kwargs(config)
    other = sorted(set(types) - {"full_attention", "sliding_attention"})
    if other:
        raise NotImplementedError(
            f"model: {config.model_type} has {other[0]} layers, which kvpack caches do not hold"
        )
    return [
        option.get("sliding_window") if kind == "sliding_attention" else None
        for kind, option in zip(types, options)
    ]


def rotary_embedding(model):
    """A reader of the rotary embedding (RoPE) of ``model``'s global-attention layers, as
    the core takes it: called, it gives ``(inv_freq, attention_scaling)``, a float32 ndarray
    of ``rotary_dim / 2`` frequencies and the factor cos and sin are scaled by. It reads
    them when called, as RoPE types that adapt to the length (``dynamic``, ``longrope``)
    change the frequencies during a forward. None for a model without one.

    Every family kvpack caches turns channel ``i`` with channel ``i + rotary_dim / 2``
    (transformers' ``rotate_half``), the layout the core assumes; the frequencies and the
    scaling are what differ between RoPE types, and transformers computes them."""
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        # Families with per-layer-type RoPE (Gemma 3) name the global layers' buffers.
        prefix = "full_attention_" if hasattr(module, "full_attention_inv_freq") else ""
        if not hasattr(module, prefix + "inv_freq"):
            continue

        def read(module=module, prefix=prefix):
            inv_freq = getattr(module, prefix + "inv_freq").detach().float().cpu().numpy()
            return inv_freq, float(getattr(module, prefix + "attention_scaling", 1.0))

        return read
    return None
