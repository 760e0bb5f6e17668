"""Independent NumPy float64 references for the kvpack operations under test."""

from __future__ import annotations

import numpy as np


def as64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def decode_attention(
    q, keys, values, indices=None, bias=None, scale=None, softcap=None, sinks=None
):
    """Returns (out [hq, d], lse [hq], weights [hq, n]) in float64 (``indices`` [hkv or hq,
    n], -1 padding a shorter row); scores capped by ``softcap`` before the bias, a sink
    logit per query head joining the softmax (in lse and the weights' total) and attending
    nothing."""
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
        held = sel >= 0  # -1 pads a row shorter than the others (its weight 0)
        sel = sel[held]
        s = k[kv, sel] @ q[h] * scale
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        if bias is not None:
            s = s + as64(bias)[kv, sel]
        m = s.max() if sinks is None else max(s.max(), float(sinks[h]))
        p = np.exp(s - m)
        total = p.sum() + (0.0 if sinks is None else np.exp(float(sinks[h]) - m))
        outs.append((p / total) @ v[kv, sel])
        lses.append(m + np.log(total))
        weights.append(np.zeros(held.shape))
        weights[-1][held] = p / total
    return np.stack(outs), np.array(lses), np.stack(weights)


def held_attention(
    queries,
    keys,
    values,
    positions,
    first_decoded,
    first_query,
    bias=None,
    scale=None,
    softcap=None,
    window=None,
    sinks=None,
):
    """float64 decode step of a batch over held slots then decoded tokens (see
    kvpack._core.held_attention): query i of row b, at p = first_query + i, attends the held
    slots at positions >= 0 and the decoded slots at positions up to p, within ``window``
    of p; scores capped by ``softcap`` before the bias; a sink logit per query head joins the
    softmax and attends nothing."""
    batch, new, heads_q, dim = queries.shape
    heads_kv, slots = keys.shape[1], keys.shape[2]
    held = positions.shape[2]
    scale = dim**-0.5 if scale is None else scale
    group = heads_q // heads_kv
    out = np.zeros((batch, new, heads_q, dim))
    for b in range(batch):
        for i in range(new):
            p = first_query + i
            for hq in range(heads_q):
                h = hq // group
                slot_positions = np.concatenate(
                    [positions[b, h], first_decoded + np.arange(slots - held)]
                )
                seen = (slot_positions >= 0) & (slot_positions <= p)
                if window is not None:
                    seen &= slot_positions > p - window
                s = scale * (as64(keys[b, h]) @ as64(queries[b, i, hq]))
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                if bias is not None:
                    s[:held] += bias[b, h]
                top = s[seen].max() if sinks is None else max(s[seen].max(), sinks[hq])
                w = np.exp(s[seen] - top)
                total = w.sum() + (0.0 if sinks is None else np.exp(sinks[hq] - top))
                out[b, i, hq] = (w / total) @ as64(values[b, h][seen])
    return out


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


# ---- compression methods (kvpack.compress) ----


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def top_set(scores, k):
    """Ascending indices of the k highest scores, ties to the lower index."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:k])


def keep_streaming(tokens, slots, sinks=4):
    head = min(sinks, slots)
    return np.concatenate([np.arange(head), np.arange(tokens - (slots - head), tokens)])


def keep_h2o(scores, slots, recent_ratio=0.5):
    tokens = len(scores)
    recent = min(round_half_up(recent_ratio * slots), slots)
    heavy = top_set(scores[: tokens - recent], slots - recent)
    return np.concatenate([heavy, np.arange(tokens - recent, tokens)])


def keep_snapkv(scores, slots, window=32, kernel=5):
    tokens = len(scores)
    window = min(window, slots)
    older = tokens - window
    half = kernel // 2
    pooled = [max(scores[max(0, t - half) : min(older, t + half + 1)]) for t in range(older)]
    return np.concatenate([top_set(pooled, slots - window), np.arange(older, tokens)])


def keydiff_scores(keys):
    """KeyDiff's score of each key of one head: minus its cosine to the mean unit key."""
    k = as64(keys)
    norms = np.linalg.norm(k, axis=-1)
    anchor = (k / np.maximum(norms, 1e-12)[:, None]).mean(axis=0)
    denominator = norms * np.linalg.norm(anchor)
    dots = k @ anchor
    return np.where(denominator > 0, -dots / np.where(denominator > 0, denominator, 1), 0.0)


def keep_keydiff(keys, slots):
    return top_set(keydiff_scores(keys), slots)


def ranks_h2o(scores, slots, recent_ratio=0.5):
    """H2O's ranking at ``slots``: the evidence, the latest tokens at +inf."""
    ranks = as64(scores).copy()
    recent = min(round_half_up(recent_ratio * slots), slots)
    ranks[len(ranks) - recent :] = np.inf
    return ranks


def ranks_snapkv(scores, slots, window=32, kernel=5):
    """SnapKV's ranking at ``slots``: older tokens max-pooled, the window at +inf."""
    tokens, window, half = len(scores), min(window, slots), kernel // 2
    older = tokens - window
    pooled = [max(scores[max(0, t - half) : min(older, t + half + 1)]) for t in range(older)]
    return np.concatenate([np.asarray(pooled, np.float64), np.full(window, np.inf)])


def adaptive_picks(ranks, budget, floor_share=0.2):
    """AdaKV's split of ``heads * budget`` slots among the rows of ``ranks`` [heads, tokens]:
    every head its best max(1, floor(floor_share * budget)) first, then the best of all the
    others in one pool (ties to the lower head, then the lower token). Each head's picks,
    ascending."""
    ranks = as64(ranks)
    heads, tokens = ranks.shape
    floor = min(budget, max(1, int(np.floor(floor_share * budget))))
    picks = [set(top_set(ranks[h], floor).tolist()) for h in range(heads)]
    pool = [(-ranks[h, t], h, t) for h in range(heads) for t in range(tokens) if t not in picks[h]]
    for _, h, t in sorted(pool)[: heads * budget - heads * floor]:
        picks[h].add(t)
    return [np.array(sorted(p), dtype=np.int64) for p in picks]


def rope_matrix(position, inv_freq, dim, scaling=1.0):
    """The [dim, dim] matrix of the rotary embedding at ``position`` (transformers'
    rotate_half layout, the angle a float32 product as transformers computes it)."""
    half = len(inv_freq)
    angles = (np.float32(position) * np.asarray(inv_freq, np.float32)).astype(np.float64)
    r = np.eye(dim)
    for i, angle in enumerate(angles):
        c, s = scaling * np.cos(angle), scaling * np.sin(angle)
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def expected_attention_scores(
    keys,
    values,
    queries,
    inv_freq=None,
    rotary_scaling=1.0,
    first_position=None,
    scale=None,
    future_positions=512,
    sinks=4,
    covariance=True,
    value_norm=True,
    epsilon=0.0,
):
    """Expected Attention's scores [heads_kv, tokens] (the sinks +inf) in float64, from
    the definition: queries taken back to no position, their mean and covariance turned by
    the rotation matrix averaged over the next positions, E[exp(scale q.k)] for q normal
    in log form, a softmax per query head over the ranked keys, the group's mean, times
    the value norm."""
    k, v, q = as64(keys), as64(values), as64(queries)
    heads_kv, tokens, dim = k.shape
    heads_q, window, _ = q.shape
    group = heads_q // heads_kv
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    first = tokens - window if first_position is None else first_position
    positions = first + np.arange(window)
    counted = positions >= sinks
    if inv_freq is not None:
        unrotated = np.empty_like(q)
        for i, p in enumerate(positions):
            r = rope_matrix(p, inv_freq, dim, rotary_scaling)
            unrotated[:, i] = np.linalg.solve(r, q[:, i].T).T
        q = unrotated
        next_position = first + window
        averaged = np.mean(
            [
                rope_matrix(p, inv_freq, dim, rotary_scaling)
                for p in range(next_position, next_position + future_positions)
            ],
            axis=0,
        )
    else:
        averaged = np.eye(dim)
    n_sinks = min(sinks, tokens)
    scores = np.full((heads_kv, tokens), np.inf)
    for h in range(heads_kv):
        ranked = k[h, n_sinks:]
        pooled = np.zeros(len(ranked))
        for g in range(group):
            x = q[h * group + g, counted]
            mu = x.mean(axis=0) if len(x) else np.zeros(dim)
            sigma = (x - mu).T @ (x - mu) / len(x) if len(x) else np.zeros((dim, dim))
            mu, sigma = averaged @ mu, averaged @ sigma @ averaged.T
            logits = scale * ranked @ mu
            if covariance:
                logits = logits + 0.5 * scale**2 * np.einsum("ti,ij,tj->t", ranked, sigma, ranked)
            weights = np.exp(logits - logits.max())
            pooled += weights / weights.sum() / group
        if value_norm:
            pooled = (pooled + epsilon) * np.linalg.norm(v[h, n_sinks:], axis=-1)
        scores[h, n_sinks:] = pooled
    return scores


def keep_expected_attention(keys, values, queries, slots, **params):
    """Kept positions [heads_kv, slots] of Expected Attention."""
    scores = expected_attention_scores(keys, values, queries, **params)
    return np.stack([top_set(s, slots) for s in scores])


def cam_head(keys, values, scores, slots, sinks=4, merge_window=32):
    """CaM in expectation for one head: (keys, values, positions)."""
    k, v, a = as64(keys), as64(values).copy(), as64(scores)
    tokens = len(a)
    sinks = min(sinks, slots)
    window = slots - sinks
    if window > 0:
        for e in range(sinks, tokens - window):
            mean = a[e + 1 : e + window + 1].mean()  # the recent window after e
            p = min(1.0, max(0.0, a[e] / mean)) if mean > 0 else 0.0
            for j in range(e + 1, min(e + merge_window, e + window) + 1):
                v[j] += p / merge_window * v[e]
    positions = keep_streaming(tokens, slots, sinks)
    return k[positions], v[positions], positions


def kvmerger_protection(fraction):
    if fraction >= 0.5:
        return 0.17, 0.12
    if fraction >= 0.35:
        t = (fraction - 0.35) / 0.15
        return 0.08 + t * 0.09, 0.02 + t * 0.10
    return 0.08 * fraction / 0.35, 0.02 * fraction / 0.35


def cosine(a, b):
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


def kvmerger_head(keys, values, scores, slots, protect_recent=None, protect_heavy=None, sigma=5.0):
    """KVMerger for one head: (keys, values, counts, positions, threshold) in float64."""
    k, v, a = as64(keys), as64(values), as64(scores)
    tokens = len(a)
    recent_share, heavy_share = kvmerger_protection(slots / tokens)
    recent_share = recent_share if protect_recent is None else protect_recent
    heavy_share = heavy_share if protect_heavy is None else protect_heavy
    recent = round_half_up(recent_share * tokens)
    heavy = round_half_up(heavy_share * tokens)
    protected = np.zeros(tokens, bool)
    protected[tokens - recent :] = True
    protected[top_set(a[: tokens - recent], heavy)] = True
    pairs = [t for t in range(tokens - 1) if not protected[t] and not protected[t + 1]]
    similarity = np.array([cosine(k[t], k[t + 1]) for t in pairs])
    merged_pairs = [pairs[i] for i in top_set(similarity, tokens - slots)]
    linked = np.zeros(tokens, bool)
    linked[merged_pairs] = True
    out_k, out_v, counts, positions = [], [], [], []
    first = 0
    while first < tokens:
        last = first
        while linked[last]:
            last += 1
        members = np.arange(first, last + 1)
        pivot = first + int(np.argmax(a[members]))
        d2 = ((k[members] - k[pivot]) ** 2).sum(axis=1)
        if sigma == "auto":
            var = d2.sum() / (len(members) - 1) if len(members) > 1 else 0.0
        else:
            var = sigma**2
        w = np.exp(-d2 / (2 * var)) if var > 0 else np.ones(len(members))
        w /= w.sum()
        out_k.append(w @ k[members])
        out_v.append(w @ v[members])
        counts.append(len(members))
        positions.append(pivot)
        first = last + 1
    threshold = similarity[top_set(similarity, tokens - slots)].min() if slots < tokens else np.inf
    return np.array(out_k), np.array(out_v), np.array(counts), np.array(positions), threshold


def compress(keys, values, method, slots, scores=None, queries=None, **params):
    """Every kvpack.compress method head by head: dict of float64 keys/values, counts, positions."""
    heads, tokens, _ = keys.shape
    out = {"keys": [], "values": [], "counts": [], "positions": []}
    if method == "expected_attention":
        expected = keep_expected_attention(keys, values, queries, slots, **params)
    for h in range(heads):
        counts = None
        if method == "full":
            positions = np.arange(tokens)
        elif method == "streaming_llm":
            positions = keep_streaming(tokens, slots, **params)
        elif method == "h2o":
            positions = keep_h2o(scores[h], slots, **params)
        elif method == "snapkv":
            positions = keep_snapkv(scores[h], slots, **params)
        elif method == "keydiff":
            positions = keep_keydiff(keys[h], slots)
        elif method == "expected_attention":
            positions = expected[h]
        elif method == "cam":
            hk, hv, positions = cam_head(keys[h], values[h], scores[h], slots, **params)
        elif method == "kvmerger":
            hk, hv, counts, positions, _ = kvmerger_head(
                keys[h], values[h], scores[h], slots, **params
            )
        else:
            raise ValueError(method)
        if method not in ("cam", "kvmerger"):
            hk, hv = as64(keys[h])[positions], as64(values[h])[positions]
        out["keys"].append(hk)
        out["values"].append(hv)
        out["counts"].append(np.ones(len(positions), int) if counts is None else counts)
        out["positions"].append(positions)
    return {name: np.stack(rows) for name, rows in out.items()}


class EvictionReference:
    """StreamingLLM / H2O decode-time eviction, simulated in float64 with token sets."""

    def __init__(self, method, budget, sinks=4, recent_ratio=0.5):
        self.method, self.budget, self.sinks = method, budget, sinks
        self.recent = round_half_up(recent_ratio * budget)

    def prefill(self, keys, values, scores=None):
        heads, tokens, _ = keys.shape
        self.k, self.v = list(as64(keys)), list(as64(values))
        size = min(tokens, self.budget)
        self.kept, self.score = [], []
        for h in range(heads):
            if self.method == "h2o":
                recent = min(self.recent, size)
                heavy = top_set(scores[h][: tokens - recent], size - recent)
                kept = np.concatenate([heavy, np.arange(tokens - recent, tokens)])
                self.score.append({int(t): float(scores[h][t]) for t in kept})
            else:
                kept = keep_streaming(tokens, size, self.sinks)
            self.kept.append([int(t) for t in kept])
        self.seen = tokens

    def step(self, q, key, value):
        heads = len(self.k)
        q = as64(q)
        group = q.shape[0] // heads
        for h in range(heads):
            self.k[h] = np.vstack([self.k[h], as64(key)[h]])
            self.v[h] = np.vstack([self.v[h], as64(value)[h]])
            self.kept[h].append(self.seen)
            if self.method == "h2o":
                self.score[h][self.seen] = 0.0
        self.seen += 1
        outs = []
        for g in range(q.shape[0]):
            h = g // group
            idx = np.array(self.kept[h])
            s = self.k[h][idx] @ q[g] / np.sqrt(q.shape[1])
            p = np.exp(s - s.max())
            p /= p.sum()
            outs.append(p @ self.v[h][idx])
            if self.method == "h2o":
                for t, w in zip(idx, p):
                    self.score[h][int(t)] += w
        if len(self.kept[0]) > self.budget:
            for h in range(heads):
                if self.method == "h2o":
                    old = [t for t in self.kept[h] if t < self.seen - self.recent]
                    victim = min(old, key=lambda t: (self.score[h][t], t))
                    del self.score[h][victim]
                else:
                    victim = min(t for t in self.kept[h] if t >= min(self.sinks, self.budget))
                self.kept[h].remove(victim)
        return np.stack(outs)


# ---- KIVI quantization (kvpack.quantize) ----


def _kivi_groups(x, bits, axis):
    """Dequantized x (float32) with one float16 (scale, minimum) per group along `axis`,
    computed in float32 like the codes are."""
    levels = np.float32(2**bits - 1)
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    minimum = lo.astype(np.float16).astype(np.float32)
    scale = ((hi - lo) / levels).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.clip(np.rint((x - minimum) / scale), 0, levels)
    codes = np.where(scale > 0, codes, 0)
    return minimum + scale * codes


def kivi_dequantize(keys, values, bits, group=32, residual=128):
    """Keys per channel over token groups, values per token over channel groups."""
    k = np.asarray(keys).astype(np.float32)
    v = np.asarray(values).astype(np.float32)
    heads, tokens, dim = k.shape
    n = max(0, tokens - residual) // group * group
    out_k, out_v = k.copy(), v.copy()
    if n:
        blocks = k[:, :n].reshape(heads, n // group, group, dim)
        out_k[:, :n] = _kivi_groups(blocks, bits, axis=2).reshape(heads, n, dim)
        for first in range(0, dim, group):
            part = v[:, :n, first : first + group]
            out_v[:, :n, first : first + group] = _kivi_groups(part, bits, axis=2)
    return out_k, out_v, n
