"""kvpack's evaluation harness: what the library is measured with, kept apart from it.

- :mod:`~kvpack.eval.scoring`: pass-key accuracy, RULER-style scores, perplexity (over
  every token and over the tokens that need the distant prompt), attention fidelity, and
  the prompt caches the store trace replays (re-exported here).
- :mod:`~kvpack.eval.tasks` and :mod:`~kvpack.eval.ruler`: the text corpus and the
  synthetic long-context prompts.
- :mod:`~kvpack.eval.data`: KV data to run on (a synthetic Llama-shaped cache, MiniLM's
  and any checkpoint's real queries, keys and values).
- :mod:`~kvpack.eval.trace`: a Zipf reuse trace and its replay through a
  :class:`kvpack.TieredStore`.
- :mod:`~kvpack.eval.demo`: ``kvpack demo``.
- :mod:`~kvpack.eval.train_tiny_lm`: the training script of the shipped tiny LM.

The library modules (attention, clustering, compression, quantization, merging, methods,
store, hf, models) never import this package; the CLI is its front end. Importing it
loads NumPy only: torch and transformers are imported by the functions that need them.
"""

from . import scoring
from .scoring import *  # noqa: F403 (the scoring functions, re-exported)

__all__ = scoring.__all__
