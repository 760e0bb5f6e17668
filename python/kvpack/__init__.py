"""kvpack: compress, recall and store the key/value cache of large language models.

A C++/CUDA core behind a NumPy API. One layer of one sequence is ``keys`` and
``values`` of shape ``[heads_kv, tokens, head_dim]`` (float32, float16 or bfloat16,
C-contiguous, never copied); a decode query is ``q`` of shape ``[heads_q, head_dim]``.

What kvpack is measured with (tasks, scoring, KV data, the demo, the store's trace
replay) is :mod:`kvpack.eval`, imported on its own: the library never imports it.
"""

from . import methods, store
from ._core import (
    __version__,
    cpu_target,
    cpu_targets,
    cuda_available,
    cuda_compiled,
    get_num_threads,
    set_num_threads,
)
from .attention import accumulated_attention, attention
from .clustering import ClusterIndex, KMeansResult, QuestIndex, RecallCache, kmeans
from .compression import (
    METHODS,
    CompressedKV,
    EvictionCache,
    budget_tokens,
    compress,
    pyramid_budgets,
)
from .merging import (
    MergingSets,
    adjacent_similarity,
    mergeable_fraction,
    merging_sets,
    similarity_profile,
)
from .quantization import QuantizedKV, quantize
from .store import StoredKV, TieredStore, context_key

__all__ = [
    "METHODS",
    "ClusterIndex",
    "CompressedKV",
    "EvictionCache",
    "KMeansResult",
    "MergingSets",
    "QuantizedKV",
    "QuestIndex",
    "RecallCache",
    "StoredKV",
    "TieredStore",
    "__version__",
    "accumulated_attention",
    "adjacent_similarity",
    "attention",
    "budget_tokens",
    "compress",
    "context_key",
    "cpu_target",
    "cpu_targets",
    "cuda_available",
    "cuda_compiled",
    "get_num_threads",
    "kmeans",
    "mergeable_fraction",
    "merging_sets",
    "methods",
    "pyramid_budgets",
    "quantize",
    "set_num_threads",
    "similarity_profile",
    "store",
]
