"""Hugging Face transformers integration: one ``Cache`` per kvpack method.

    cache = kvpack.hf.make_cache(model, method="clusterkv", budget=256)
    model.generate(input_ids, cache=cache, max_new_tokens=32)

transformers takes the cache as ``cache=`` since it renamed ``past_key_values``; older 5.x
releases take ``past_key_values=``. :func:`cache_argument` names the one the installed
release takes (``model.generate(ids, **{kvpack.hf.cache_argument(model): cache})``).

Works with Llama/Mistral/Qwen-style decoders: any model whose attention layers hand their
keyword arguments to the cache's ``update`` and then to the configured attention function,
as transformers 5's decoders do. ``make_cache``
switches the model's attention implementation to ``"kvpack"``: SDPA for every other
cache, and for a kvpack cache the method's own attention. The first ``skip_layers``
layers keep their whole cache.

The first forward is the prefill: attention is exact over the whole prompt, then each
layer compresses; later forwards decode, one token or a chunk at a time (so a prompt
prefilled in chunks is compressed after its first chunk). Per method:

- ``h2o``, ``streaming_llm``, ``snapkv``, ``cam``, ``kvmerger``: the prompt's cache is
  compressed to ``budget`` slots per KV head by :func:`kvpack.compress`, ranked by the
  attention the prompt's queries paid each key. Decoded tokens are appended.
- ``clusterkv``, ``quest``: the whole cache stays in host memory in a
  :class:`kvpack.RecallCache` per sequence; each decoded token attends ``budget`` recalled
  tokens (clusters, or Quest pages).
- ``kivi``: the prompt's cache becomes KIVI codes (:func:`kvpack.quantize`, ``bits``,
  group 32) with the latest ``budget`` tokens in full precision; decode attends the codes
  directly and the decoded tokens in full precision, merged by log-sum-exp.
- ``full``: no compression (a reference that runs the same code path).

``method`` is a name or a :mod:`kvpack.methods` object (``kvpack.methods.SnapKV(window=16)``).
``budget`` is a token count, or a fraction of each prompt in (0, 1). Batches may be
left-padded: padding never takes a slot.
"""

from .._extras import require

require("kvpack.hf", "torch", "transformers")

from .cache import METHODS, KVPackCache, make_cache  # noqa: E402
from .compat import cache_argument, returned_cache  # noqa: E402
from .prefill import Prefill, dynamic_cache, prefill, stored_cache  # noqa: E402

__all__ = [
    "METHODS",
    "KVPackCache",
    "Prefill",
    "cache_argument",
    "dynamic_cache",
    "make_cache",
    "prefill",
    "returned_cache",
    "stored_cache",
]
