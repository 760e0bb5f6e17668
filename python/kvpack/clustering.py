"""Semantic clustering of keys (ClusterKV) and page summaries (Quest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import _core

__all__ = ["KMeansResult", "kmeans"]


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
    result = _core.kmeans(x, n_clusters, iters, seed, spherical, init, init_centroids)
    return KMeansResult(**result)
