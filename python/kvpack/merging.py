"""What a researcher looks at before merging: how similar adjacent keys are, which runs
of them a threshold would merge, and what share of the tokens that covers (KVMerger's
observations, per layer and head)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import _core

__all__ = [
    "MergingSets",
    "adjacent_similarity",
    "mergeable_fraction",
    "merging_sets",
    "similarity_profile",
]


def adjacent_similarity(keys: np.ndarray) -> np.ndarray:
    """Cosine similarity of each key with the next.

    Parameters
    ----------
    keys : ndarray, shape (heads_kv, tokens, head_dim)
        float32, float16 or bfloat16, C-contiguous, at least 2 tokens.

    Returns
    -------
    ndarray of float32, shape (heads_kv, tokens - 1)
        ``out[h, t] = cos(keys[h, t], keys[h, t + 1])``; 0 where a key is zero.
    """
    return _core.adjacent_similarity(keys)


@dataclass(frozen=True)
class MergingSets:
    """Runs of adjacent keys whose neighbour similarity is at least ``threshold``.

    Every token belongs to exactly one run; a run of one is a token nothing merges with.

    Attributes
    ----------
    starts, sizes : list of ndarray of int64, one per KV head
        First token and length of each run, in order; ``sizes`` sum to ``tokens``.
    threshold : float
    tokens : int
    """

    starts: list[np.ndarray]
    sizes: list[np.ndarray]
    threshold: float
    tokens: int

    def histogram(self) -> np.ndarray:
        """Runs of each size summed over heads: ``out[s]`` = runs of ``s`` tokens."""
        counts = np.zeros(self.tokens + 1, dtype=np.int64)
        for sizes in self.sizes:
            counts += np.bincount(sizes, minlength=self.tokens + 1)
        return counts

    def mergeable_fraction(self) -> np.ndarray:
        """Share of each head's tokens that lie in a run of two or more, shape (heads_kv,)."""
        return np.array([sizes[sizes > 1].sum() / self.tokens for sizes in self.sizes])

    def merged_length(self) -> np.ndarray:
        """Slots per head if every run became one slot, shape (heads_kv,)."""
        return np.array([len(sizes) for sizes in self.sizes])


def merging_sets(keys: np.ndarray, threshold: float = 0.75) -> MergingSets:
    """The merging sets of KVMerger's paper: maximal runs of adjacent keys whose
    neighbour cosine similarity is at least ``threshold`` (default 0.75).

    Parameters
    ----------
    keys : ndarray, shape (heads_kv, tokens, head_dim)
    threshold : float

    Returns
    -------
    MergingSets
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold: expected a number, got {type(threshold).__name__}")
    if not -1.0 <= float(threshold) <= 1.0:  # NaN fails too
        raise ValueError(f"threshold: expected a cosine similarity in [-1, 1], got {threshold}")
    similarity = adjacent_similarity(keys)
    tokens = similarity.shape[1] + 1
    starts, sizes = [], []
    for linked in similarity >= threshold:
        # A run starts at token 0 and after every neighbour pair below the threshold.
        head_starts = np.concatenate(([0], np.flatnonzero(~linked) + 1))
        starts.append(head_starts)
        sizes.append(np.diff(np.append(head_starts, tokens)))
    return MergingSets(starts=starts, sizes=sizes, threshold=float(threshold), tokens=tokens)


def mergeable_fraction(keys: np.ndarray, threshold: float = 0.75) -> np.ndarray:
    """Share of each head's tokens in a merging set of two or more, shape (heads_kv,)."""
    return merging_sets(keys, threshold).mergeable_fraction()


def similarity_profile(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Mean adjacent-key cosine similarity per layer and head.

    Parameters
    ----------
    layers : sequence of ndarray, each (heads_kv, tokens, head_dim)
        One layer's keys each (e.g. a model's whole prompt cache).

    Returns
    -------
    ndarray of float64, shape (layers, heads_kv)
    """
    return np.stack([adjacent_similarity(k).mean(axis=1, dtype=np.float64) for k in layers])
