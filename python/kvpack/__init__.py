"""kvpack: compress, recall and store the key/value cache of large language models.

A C++/CUDA core behind a NumPy API. One layer of one sequence is ``keys`` and
``values`` of shape ``[heads_kv, tokens, head_dim]`` (float32, float16 or bfloat16,
C-contiguous, never copied); a decode query is ``q`` of shape ``[heads_q, head_dim]``.
"""

from . import data
from ._core import (
    __version__,
    cuda_available,
    cuda_compiled,
    get_num_threads,
    set_num_threads,
)
from .attention import accumulated_attention, attention
from .clustering import ClusterIndex, ClusterKV, KMeansResult, QuestIndex, kmeans

__all__ = [
    "ClusterIndex",
    "ClusterKV",
    "KMeansResult",
    "QuestIndex",
    "__version__",
    "accumulated_attention",
    "attention",
    "cuda_available",
    "cuda_compiled",
    "data",
    "get_num_threads",
    "kmeans",
    "set_num_threads",
]
