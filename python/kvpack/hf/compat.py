"""What differs between transformers releases, in one place: the keyword a model takes
its cache under, and the name of the cache a forward returns."""

from __future__ import annotations

import inspect

from transformers.cache_utils import Cache


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
