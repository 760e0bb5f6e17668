"""Independent NumPy float64 references for the kvpack operations under test."""

from __future__ import annotations

import numpy as np


def as64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def decode_attention(q, keys, values, indices=None, bias=None, scale=None):
    """Returns (out [hq, d], lse [hq], weights [hq, n]) in float64."""
    q, k, v = as64(q), as64(keys), as64(values)
    heads_q, dim = q.shape
    heads_kv, tokens, _ = k.shape
    group = heads_q // heads_kv
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    outs, lses, weights = [], [], []
    for h in range(heads_q):
        kv = h // group
        if indices is None:
            sel = np.arange(tokens)
        else:
            sel = indices[h] if indices.shape[0] == heads_q else indices[kv]
        s = k[kv, sel] @ q[h] * scale
        if bias is not None:
            s = s + as64(bias)[kv, sel]
        m = s.max()
        p = np.exp(s - m)
        total = p.sum()
        outs.append((p / total) @ v[kv, sel])
        lses.append(m + np.log(total))
        weights.append(p / total)
    return np.stack(outs), np.array(lses), np.stack(weights)


def accumulated_attention(queries, keys, causal=True, reduction="sum", per_query_head=False):
    """Attention each key receives from the window of queries, float64."""
    qs, k = as64(queries), as64(keys)
    heads_q, window, dim = qs.shape
    heads_kv, tokens, _ = k.shape
    group = heads_q // heads_kv
    per_head = np.zeros((heads_q, tokens))
    seen = np.zeros(tokens)
    for i in range(window):
        visible = tokens - window + i + 1 if causal else tokens
        seen[:visible] += 1
        for h in range(heads_q):
            s = k[h // group, :visible] @ qs[h, i] / np.sqrt(dim)
            p = np.exp(s - s.max())
            per_head[h, :visible] += p / p.sum()
    if reduction == "mean":
        per_head = per_head / seen
    if per_query_head:
        return per_head
    grouped = per_head.reshape(heads_kv, group, tokens).sum(axis=1)
    return grouped / group if reduction == "mean" else grouped


def kmeans(x, init_centroids, iters, spherical=True):
    """Lloyd's k-means in float64 with kvpack's rules; returns (centroids, labels, history)."""
    x = as64(x)
    if spherical:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    c = as64(init_centroids).copy()
    if spherical:
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
    k = c.shape[0]
    history, previous = [], None
    for it in range(iters):
        if spherical:
            scores = x @ c.T
            labels = scores.argmax(axis=1)
            costs = 1.0 - scores[np.arange(len(x)), labels]
        else:
            d2 = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]
            labels = d2.argmin(axis=1)
            costs = np.maximum(d2[np.arange(len(x)), labels], 0.0)
        history.append(costs.sum())
        if it > 0 and np.array_equal(labels, previous):
            break
        for j in range(k):
            members = x[labels == j]
            if len(members) == 0:
                far = int(np.argmax(costs))
                c[j] = x[far]
                costs[far] = -np.inf
                continue
            mean = members.mean(axis=0)
            c[j] = mean / np.linalg.norm(mean) if spherical else mean
        previous = labels
    return c, labels, history
