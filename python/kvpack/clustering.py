"""Semantic clustering of keys (ClusterKV), page summaries (Quest), and the decode-time
recall cache that selects tokens with either."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _core
from . import methods as _methods

__all__ = ["ClusterIndex", "KMeansResult", "QuestIndex", "RecallCache", "kmeans"]


@dataclass
class KMeansResult:
    """Result of :func:`kmeans`; leading ``heads`` axis when the input was batched.

    Attributes
    ----------
    centroids : ndarray of float32, shape ([heads,] n_clusters, d)
        Unit norm when spherical.
    labels : ndarray of int32, shape ([heads,] n)
    objective : float or ndarray of float64, shape (heads,)
        Sum over points of ``1 - cos(x, centroid)`` (spherical) or of the squared
        distance, under the returned centroids.
    iterations : int or ndarray of int32, shape (heads,)
        Assignments done; fewer than ``iters`` when the labels stopped changing.
    history : list of float, or list of lists
        Objective after each assignment; never increases.
    """

    centroids: np.ndarray
    labels: np.ndarray
    objective: float | np.ndarray
    iterations: int | np.ndarray
    history: list


def kmeans(
    x: np.ndarray,
    n_clusters: int,
    iters: int = 20,
    seed: int = 0,
    spherical: bool = True,
    init: Literal["kmeans++", "random"] = "kmeans++",
    init_centroids: np.ndarray | None = None,
    device: Literal["cpu", "cuda"] = "cpu",
) -> KMeansResult:
    """Cosine (spherical) or Euclidean k-means, per head when batched.

    Assignment is a GEMM plus an argmax (ties to the lower index); empty clusters are
    re-seeded from the points farthest from their centroid; iterations stop early when
    no label changes. Deterministic for a seed and any thread count.

    Parameters
    ----------
    x : ndarray, shape (n, d) or (heads, n, d)
        float32, float16 or bfloat16, C-contiguous; spherical k-means normalises rows.
    n_clusters : int
        ``1 <= n_clusters <= n``.
    iters : int
        Most assignment + update rounds.
    seed : int
        Seed of the initialisation.
    spherical : bool
        Cosine k-means (ClusterKV) when True, Euclidean when False.
    init : {"kmeans++", "random"}
        k-means++ sampling or a random sample of distinct points.
    init_centroids : ndarray, shape ([heads,] n_clusters, d), optional
        Start from these centroids instead of ``init``.
    device : {"cpu", "cuda"}
        Backend; the CUDA one starts from the same initial centroids.

    Returns
    -------
    KMeansResult

    Examples
    --------
    >>> import numpy as np, kvpack
    >>> x = np.random.default_rng(0).standard_normal((1000, 64)).astype(np.float32)
    >>> kvpack.kmeans(x, 10).labels.shape
    (1000,)
    """
    result = _core.kmeans(x, n_clusters, iters, seed, spherical, init, init_centroids, device)
    return KMeansResult(**result)


class ClusterIndex:
    """ClusterKV's index of one layer: keys clustered per KV head by cosine k-means.

    The first ``sink`` tokens are never clustered and always selected. Tokens appended
    later wait in an unclustered window (always selected) until ``append_interval`` of
    them are clustered into ``append_clusters`` new clusters.

    Parameters
    ----------
    keys : ndarray, shape (heads_kv, tokens, head_dim)
        float32, float16 or bfloat16, C-contiguous (post-RoPE, as models cache them).
    n_clusters : int, optional
        Clusters per head at prefill; default ``(tokens - sink) // tokens_per_cluster``
        (400 at 32k).
    **params
        ``sink`` (leading tokens kept out of clustering and always attended), ``iters``,
        ``seed``, ``init`` (k-means), ``append_interval`` and ``append_clusters`` (decoded
        tokens clustered together, into this many clusters), ``tokens_per_cluster``: as
        :class:`kvpack.methods.ClusterKV`, whose defaults they take.

    Attributes
    ----------
    centroids : ndarray of float32, shape (heads_kv, n_clusters, head_dim)
        Mean key of each cluster (what a query scores).
    sizes : ndarray of int32, shape (heads_kv, n_clusters)
    offsets : ndarray of int32, shape (heads_kv, n_clusters + 1)
        CSR offsets into ``order``.
    order : ndarray of int32, shape (heads_kv, clustered)
        Clustered token ids grouped by cluster, ascending within one.
    labels : ndarray of int32, shape (heads_kv, clustered_until)
        Cluster of each token; -1 for the sinks.

    The arrays are read-only zero-copy views of a snapshot of the index; a view taken
    before an ``append`` that adds clusters keeps showing the earlier snapshot.
    """

    def __init__(self, keys: np.ndarray, n_clusters: int | None = None, **params: Any) -> None:
        self._index = _core.ClusterIndex(keys, n_clusters or 0, **params)

    def append(self, new_keys: np.ndarray) -> None:
        """Adds decoded tokens' keys, shape (heads_kv, head_dim) or (heads_kv, n, head_dim)."""
        self._index.append(new_keys)

    def select(
        self, q: np.ndarray, budget: int, window: int = 0, per_query_head: bool = False
    ) -> np.ndarray:
        """Token ids to attend for the decode query ``q``.

        ``budget`` tokens of the clustered range: the sinks, the last ``window`` tokens and
        the newest token always, then whole clusters in the order of ``q . centroid``, the
        last cluster cut to fit. The unclustered window (decoded tokens waiting to be
        clustered) comes on top of the budget, as in ClusterKV's reference code.

        Parameters
        ----------
        q : ndarray, shape (heads_q, head_dim)
        budget : int
            Tokens per row; all tokens when the budget exceeds them.
        window : int
            Most recent tokens always included.
        per_query_head : bool
            One row per query head (each head ranks clusters with its own query), or one
            row per KV head ranking by the group's summed scores.

        Returns
        -------
        ndarray of int32, shape (heads_kv or heads_q, min(budget, clustered_until) +
        tokens - clustered_until), ascending rows
        """
        return self._index.select(q, budget, window, per_query_head)

    def __getattr__(self, name):
        if name in {
            "heads",
            "head_dim",
            "tokens",
            "sink",
            "n_clusters",
            "clustered_until",
            "centroids",
            "sizes",
            "offsets",
            "order",
            "labels",
        }:
            return getattr(self._index, name)
        raise AttributeError(name)


class QuestIndex:
    """Quest's page index: per page of ``page_size`` tokens, the channel-wise min and max key.

    Parameters
    ----------
    keys : ndarray, shape (heads_kv, tokens, head_dim)
    page_size : int
        Tokens per page [16].
    """

    def __init__(self, keys: np.ndarray, page_size: int = 16) -> None:
        self._index = _core.QuestIndex(keys, page_size)

    def append(self, new_keys: np.ndarray) -> None:
        """Adds decoded tokens' keys, shape (heads_kv, head_dim) or (heads_kv, n, head_dim)."""
        self._index.append(new_keys)

    def select(self, q: np.ndarray, budget: int, per_query_head: bool = False) -> np.ndarray:
        """Token ids to attend: the current page, then pages by their upper bound of q . k.

        A page scores ``sum_i max(q_i * min_i, q_i * max_i)``; pages are taken in that
        order until ``budget`` tokens, the last page cut to fit.

        Returns
        -------
        ndarray of int32, shape (heads_kv or heads_q, min(budget, tokens)), ascending rows
        """
        return self._index.select(q, budget, per_query_head)

    @property
    def page_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) per page, each of shape (heads_kv, pages, head_dim) (copies)."""
        return self._index.page_bounds

    def __getattr__(self, name):
        if name in {"heads", "head_dim", "tokens", "page_size", "pages"}:
            return getattr(self._index, name)
        raise AttributeError(name)


class RecallCache:
    """Decode-time recall of one layer's KV cache: ClusterKV's clusters, or Quest's pages
    with ``method="quest"``.

    The full cache stays in a slow tier (host memory). Each :meth:`step` appends the new
    token, selects ``budget`` tokens and attends them: score, select, gather, attention
    in one call. With ``fast_tier=True`` the tokens recalled in the last ``recall_steps``
    steps stay in a fast tier and a step loads only the misses; by default the step
    attends the selected tokens where they are, since on the host both tiers are the
    same memory and copying would only cost time. Either way :attr:`last_step` and
    :attr:`total` count what a fast tier hits and loads.

    Parameters
    ----------
    budget : int
        Tokens attended per step [1024]. ClusterKV attends the decoded tokens not yet
        clustered (fewer than ``append_interval``) on top of it, as its reference code
        does, and every step its own token.
    method : {"clusterkv", "quest"} or their kvpack.methods object
    **params
        The method's parameters (:class:`kvpack.methods.ClusterKV`,
        :class:`kvpack.methods.Quest`), defaults in brackets:
    n_clusters, tokens_per_cluster, sink, iters, seed, init, append_interval, append_clusters
        ClusterKV clustering (see :class:`ClusterIndex`); unused by Quest. The automatic
        ``n_clusters`` is the paper's ``(tokens - sink) // 80``, raised where needed so
        that the mean cluster holds at most ``budget / 12`` tokens (as with 1024 at 32k).
    window : int
        Most recent tokens always attended [0] (ClusterKV; Quest always keeps its
        current page).
    recall_steps : int
        R: tokens recalled in the last R steps stay in the fast tier [1].
    fast_tier : bool
        Copy recalled tokens into a fast tier kept for R steps [False: attend in place].
    per_query_head : bool
        Each query head selects its own tokens (GQA) instead of one set per KV head.
    refine : int
        The method recalls ``refine * budget`` candidates (whole clusters or pages), then
        the step keeps the ``budget`` of them with the highest exact ``q . k`` (summed over
        a KV head's query heads unless ``per_query_head``), besides the tokens the method
        always attends [1: the method's own selection]. A cluster or page shared by a
        relevant token and its neighbours then no longer spends the budget on all of them.
    slow_bits : {0, 4, 8}
        0: the slow tier holds the prompt as given [0]. 4 or 8: as KIVI codes of that many
        bits (keys per channel over ``slow_group`` tokens, values per token over
        ``slow_group`` channels, float16 ranges); the prompt's last ``slow_group`` tokens
        and every decoded token stay exact. A step scores and attends the recalled tokens
        from their codes, reading only theirs; the index (centroids, page bounds) is built
        from the exact prompt at the prefill. Needs ``fast_tier=False``.
    slow_group : int
        Tokens per key range and channels per value range of the codes [128].
    page_size : int
        Quest page size [16].

    Examples
    --------
    >>> import numpy as np, kvpack
    >>> rng = np.random.default_rng(0)
    >>> k = rng.standard_normal((2, 2000, 64)).astype(np.float16)
    >>> recall = kvpack.RecallCache(budget=256)
    >>> recall.prefill(k, k)
    >>> out = recall.step(rng.standard_normal((8, 64)), k[:, -1], k[:, -1])
    >>> out.shape, recall.last_step["selected"]  # 256 + the decoded token, per KV head
    ((8, 64), 514)
    """

    def __init__(
        self,
        budget: int = 1024,
        method: Literal["clusterkv", "quest"] | _methods.Method = "clusterkv",
        **params,
    ) -> None:
        self.method = _methods.resolve(method, **params)
        self._recall = _core.RecallCache(budget, self.method)

    def prefill(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Stores the prompt's cache, shape (heads_kv, tokens, head_dim), and builds the index."""
        self._recall.prefill(keys, values)

    def step(self, q: np.ndarray, new_key: np.ndarray, new_value: np.ndarray) -> np.ndarray:
        """Appends the new token and attends over the recalled tokens.

        Parameters
        ----------
        q : ndarray, shape (heads_q, head_dim)
        new_key, new_value : ndarray, shape (heads_kv, head_dim)
            The new token's key and value, in the dtype of the prefill.

        Returns
        -------
        ndarray of float32, shape (heads_q, head_dim)
        """
        return self._recall.step(q, new_key, new_value)

    @property
    def tokens(self) -> int:
        """Tokens in the cache."""
        return self._recall.tokens

    @property
    def nbytes(self) -> dict[str, int]:
        """Key and value bytes held per tier: ``{"slow": ..., "fast": ..., "codes": ...}``
        (the slow tier's exact rows, its spare room for decoded tokens included; ``fast`` is
        0 in place; ``codes``: the prompt's KIVI codes with ``slow_bits``, else 0)."""
        return self._recall.nbytes

    @property
    def n_clusters(self) -> int:
        """Clusters per KV head in the index (0 for Quest, or before the prefill)."""
        return self._recall.n_clusters

    @property
    def last_step(self) -> dict:
        """The last step's selected, hits, loaded, bytes_loaded and hit_rate (over KV heads),
        and candidates: the keys scored exactly to refine the selection (over rows)."""
        return self._recall.last_step

    @property
    def total(self) -> dict:
        """The same counts summed over every step since the prefill."""
        return self._recall.total

    @property
    def last_selection(self) -> np.ndarray:
        """Token ids attended in the last step, shape (rows, n), ascending rows; with
        adaptive head budgets rows attend different numbers of tokens, the shorter ones
        padded with -1."""
        return self._recall.last_selection

    @property
    def last_candidates(self) -> np.ndarray:
        """With ``refine > 1``, the tokens the method recalled in the last step before the
        exact scores kept :attr:`last_selection`, shape (rows, n), ascending rows; shape
        (rows, 0) otherwise."""
        return self._recall.last_candidates
