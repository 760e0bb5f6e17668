import numpy as np
import pytest

import kvpack

import reference


def topic_keys(rng, heads=2, tokens=3000, dim=32, topics=24, run=20, noise=0.3):
    """Keys drawn around topic directions in runs scattered over the context."""
    centres = rng.standard_normal((heads, topics, dim))
    n_runs = tokens // run + 1
    topic_of = np.repeat(rng.integers(0, topics, size=n_runs), run)[:tokens]
    keys = centres[:, topic_of] + noise * rng.standard_normal((heads, tokens, dim))
    return keys.astype(np.float32), centres, topic_of


def reference_select(index, q, budget, window=0, per_query_head=False, prompt=None):
    """NumPy re-statement of ClusterIndex.select from the index's arrays (``prompt``:
    tokens the index was built on, default all)."""
    prompt = index.tokens if prompt is None else prompt
    heads, tokens, sink, end = index.heads, index.tokens, index.sink, index.clustered_until
    group = q.shape[0] // heads
    # The budget holds tokens of the clustered range; unclustered ones come on top (or,
    # right after they were clustered, the newest decoded token).
    on_top = tokens - end or int(tokens > prompt)
    count = min(budget, tokens - on_top) + on_top
    if count >= tokens:
        rows = q.shape[0] if per_query_head else heads
        return np.tile(np.arange(tokens, dtype=np.int32), (rows, 1))
    recent = max(sink, min(tokens - on_top, tokens - window))
    always = list(range(sink)) + list(range(recent, tokens))
    out = []
    for r in range(q.shape[0] if per_query_head else heads):
        head = r // group if per_query_head else r
        query = q[r] if per_query_head else q[head * group : (head + 1) * group].sum(0)
        scores = index.centroids[head].astype(np.float64) @ query.astype(np.float64)
        ranked = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
        taken = list(always)
        for c in ranked:
            members = index.order[head, index.offsets[head, c] : index.offsets[head, c + 1]]
            for t in members:
                if len(taken) == count:
                    break
                if t not in always:
                    taken.append(int(t))
        out.append(sorted(taken))
    return np.array(out, dtype=np.int32)


def test_index_structure(rng):
    keys, _, _ = topic_keys(rng)
    index = kvpack.ClusterIndex(keys)
    heads, tokens = 2, 3000
    assert index.n_clusters == (tokens - 16) // 80
    assert index.sizes.sum(axis=1).tolist() == [tokens - 16] * heads
    np.testing.assert_array_equal(index.offsets[:, 1:], np.cumsum(index.sizes, axis=1))
    for h in range(heads):
        np.testing.assert_array_equal(index.labels[h, :16], -1)
        for c in range(index.n_clusters):
            members = index.order[h, index.offsets[h, c] : index.offsets[h, c + 1]]
            assert np.all(np.diff(members) > 0)
            assert np.all(index.labels[h, members] == c)
            mean = keys[h, members].astype(np.float64).mean(axis=0)
            np.testing.assert_allclose(index.centroids[h, c], mean, atol=1e-5)
    assert not index.centroids.flags.writeable and not index.centroids.flags.owndata


def test_clusters_follow_the_topics(rng):
    keys, _, topic_of = topic_keys(rng, topics=24, noise=0.1)
    index = kvpack.ClusterIndex(keys, n_clusters=48, sink=0)
    # Each cluster is (nearly) one topic.
    for h in range(2):
        purity = sum(
            np.bincount(topic_of[index.labels[h] == c]).max()
            for c in range(48)
            if np.any(index.labels[h] == c)
        )
        assert purity / len(topic_of) > 0.95


@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize(("budget", "window"), [(300, 0), (500, 40), (16, 0), (5000, 0)])
def test_select_matches_reference(rng, per_query_head, budget, window):
    keys, _, _ = topic_keys(rng)
    index = kvpack.ClusterIndex(keys)
    q = rng.standard_normal((8, 32)).astype(np.float32)
    got = index.select(q, budget, window=window, per_query_head=per_query_head)
    expected = reference_select(index, q, budget, window, per_query_head)
    assert got.shape == (8 if per_query_head else 2, min(budget, 3000))
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.diff(got, axis=1) > 0)
    assert np.all(got[:, :16] == np.arange(16))  # sinks always in


def test_append_clusters_every_interval(rng):
    keys, _, _ = topic_keys(rng, tokens=1000)
    index = kvpack.ClusterIndex(keys, n_clusters=10, append_interval=64, append_clusters=4)
    labels_before = index.labels
    for i in range(100):  # 100 new tokens: one batch of 64 clustered, 36 waiting
        index.append(keys[:, i])
    assert index.tokens == 1100 and index.n_clusters == 14 and index.clustered_until == 1064
    assert labels_before.shape == (2, 1000)  # an earlier view keeps its snapshot
    assert np.all(index.labels[:, 1000:1064] >= 10)
    q = rng.standard_normal((2, 32)).astype(np.float32)
    selection = index.select(q, 200)
    assert selection.shape == (2, 200 + 36)  # the unclustered window on top of the budget
    assert np.all(np.isin(np.arange(1064, 1100), selection))
    np.testing.assert_array_equal(selection, reference_select(index, q, 200, prompt=1000))
    for i in range(100, 128):  # the next batch is clustered at 1128: the newest is on top
        index.append(keys[:, i])
    selection = index.select(q, 200)
    assert selection.shape == (2, 201) and np.all(selection[:, -1] == 1127)
    np.testing.assert_array_equal(selection, reference_select(index, q, 200, prompt=1000))


def test_quest_pages_and_selection(rng):
    keys, _, _ = topic_keys(rng, tokens=1000)
    quest = kvpack.QuestIndex(keys, page_size=16)
    lo, hi = quest.page_bounds
    assert quest.pages == 63 and lo.shape == (2, 63, 32)
    np.testing.assert_array_equal(lo[:, 3], keys[:, 48:64].min(axis=1))
    np.testing.assert_array_equal(hi[:, -1], keys[:, 992:].max(axis=1))
    q = rng.standard_normal((4, 32)).astype(np.float32)
    got = quest.select(q, 200)
    for h in range(2):
        qg = q[2 * h : 2 * h + 2].astype(np.float64)
        scores = np.maximum(qg[:, None] * lo[h][None], qg[:, None] * hi[h][None]).sum(axis=(0, 2))
        ranked = sorted(range(63), key=lambda p: (-scores[p], p))
        taken = list(range(992, 1000))  # the current (last, partial) page
        for p in ranked:
            for t in range(16 * p, min(16 * p + 16, 1000)):
                if len(taken) < 200 and t not in taken:
                    taken.append(t)
        np.testing.assert_array_equal(got[h], sorted(taken))
    quest.append(keys[:, :20])
    assert quest.tokens == 1020 and quest.pages == 64
    lo, hi = quest.page_bounds
    np.testing.assert_array_equal(lo[:, 62], np.minimum(keys[:, 992:].min(1), keys[:, :8].min(1)))


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("fast_tier", "refine"), [(False, 1), (True, 1), (False, 2), (True, 4)])
def test_step_equals_dense_attention_when_budget_covers_context(
    rng, method, dtype, fast_tier, refine
):
    keys, _, _ = topic_keys(rng, tokens=700)
    keys = keys.astype(dtype)
    values = rng.standard_normal(keys.shape).astype(dtype)
    recall = kvpack.RecallCache(budget=2000, method=method, fast_tier=fast_tier, refine=refine)
    recall.prefill(keys, values)
    k, v = keys, values
    for _ in range(3):
        q = rng.standard_normal((8, 32)).astype(np.float32)
        new_k = rng.standard_normal((2, 32)).astype(dtype)
        new_v = rng.standard_normal((2, 32)).astype(dtype)
        out = recall.step(q, new_k, new_v)
        k = np.concatenate([k, new_k[:, None]], axis=1)
        v = np.concatenate([v, new_v[:, None]], axis=1)
        expected, _, _ = reference.decode_attention(q, k, v)
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    assert recall.tokens == 703


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("fast_tier", [False, True])
def test_step_attends_exactly_the_selection(rng, method, per_query_head, fast_tier):
    keys, _, _ = topic_keys(rng)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    recall = kvpack.RecallCache(
        budget=256, method=method, per_query_head=per_query_head, fast_tier=fast_tier
    )
    recall.prefill(keys, values)
    k, v = keys, values
    for step in range(4):
        q = rng.standard_normal((8, 32)).astype(np.float32)
        new_k, new_v = keys[:, step], values[:, step]
        out = recall.step(q, new_k, new_v)
        k = np.concatenate([k, new_k[:, None]], axis=1)
        v = np.concatenate([v, new_v[:, None]], axis=1)
        selection = recall.last_selection
        decoded = step + 1 if method == "clusterkv" else 0  # unclustered: on top of the budget
        assert selection.shape == (8 if per_query_head else 2, 256 + decoded)
        assert selection[0, -1] == k.shape[1] - 1  # the new token is attended
        expected, _, _ = reference.decode_attention(q, k, v, indices=selection)
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
        stats = recall.last_step
        assert stats["hits"] + stats["loaded"] == stats["selected"]
        assert stats["bytes_loaded"] == stats["loaded"] * 2 * 32 * 4


def row_queries(q, row, heads, per_query_head):
    """The float64 queries of a selection row: one query head, or a KV head's group."""
    if per_query_head:
        return reference.as64(q[row : row + 1])
    group = q.shape[0] // heads
    return reference.as64(q[row * group : (row + 1) * group])


def reference_quest_select(keys, q, budget, page_size=16, per_query_head=False):
    """NumPy float64 re-statement of QuestIndex.select over keys [heads, tokens, dim]."""
    heads, tokens, _ = keys.shape
    group = q.shape[0] // heads
    count = min(budget, tokens)
    pages = -(-tokens // page_size)
    current = max(0, tokens - min(count, tokens - (pages - 1) * page_size))
    out = []
    for r in range(q.shape[0] if per_query_head else heads):
        head = r // group if per_query_head else r
        qs = row_queries(q, r, heads, per_query_head)
        scores = []
        for p in range(pages):
            page = reference.as64(keys[head, p * page_size : (p + 1) * page_size])
            lo, hi = page.min(0), page.max(0)
            scores.append(np.maximum(qs * lo, qs * hi).sum())
        taken = list(range(current, tokens))
        for p in sorted(range(pages), key=lambda p: (-scores[p], p)):
            for t in range(p * page_size, min((p + 1) * page_size, tokens)):
                if len(taken) < count and t not in taken:
                    taken.append(t)
        out.append(sorted(taken))
    return np.array(out, dtype=np.int32)


def reference_refine(candidates, always, keys, q, count, per_query_head):
    """Keeps, per row, the always attended tokens and then the candidates with the highest
    float64 q . k (summed over a KV head's query heads), ties to the earlier token."""
    heads = keys.shape[0]
    group = q.shape[0] // heads
    out = []
    for r, row in enumerate(candidates):
        head = r // group if per_query_head else r
        qs = row_queries(q, r, heads, per_query_head)
        scores = (reference.as64(keys[head, row]) @ qs.T).sum(1)
        scores[np.isin(row, always)] = np.inf
        order = sorted(range(len(row)), key=lambda j: (-scores[j], j))
        out.append(sorted(row[j] for j in order[:count]))
    return np.array(out, dtype=np.int32)


@pytest.mark.parametrize("method", ["clusterkv", "clusterkv_refined", "quest"])
@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("fast_tier", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_refined_step_matches_reference(rng, method, per_query_head, fast_tier, dtype):
    # The whole refined step against float64: the method's candidates (refine x budget),
    # the budget kept by exact scores, and attention over it. "clusterkv_refined" is
    # ClusterKV's step with refine 4 by default.
    keys, _, _ = topic_keys(rng, tokens=1500)
    keys = keys.astype(dtype)
    values = rng.standard_normal(keys.shape).astype(dtype)
    budget, window = 128, 8
    options = dict(per_query_head=per_query_head, fast_tier=fast_tier)
    if method == "clusterkv_refined":
        refine = 4
    else:
        refine = options["refine"] = 3
    if method.startswith("clusterkv"):
        options.update(n_clusters=60, window=window)
        index = kvpack.ClusterIndex(keys, n_clusters=60)
    recall = kvpack.RecallCache(budget=budget, method=method, **options)
    recall.prefill(keys, values)
    k, v = keys, values
    for step in range(3):
        q = rng.standard_normal((8, 32)).astype(np.float32)
        new_k, new_v = keys[:, 100 + step], values[:, 100 + step]  # near-duplicates of a run
        out = recall.step(q, new_k, new_v)
        k = np.concatenate([k, new_k[:, None]], axis=1)
        v = np.concatenate([v, new_v[:, None]], axis=1)
        tokens = k.shape[1]
        if method.startswith("clusterkv"):
            index.append(new_k)
            candidates = reference_select(
                index, q, budget * refine, window, per_query_head, prompt=1500
            )
            on_top = tokens - index.clustered_until
            recent = max(16, min(tokens - on_top, tokens - window))
            always = np.r_[np.arange(16), np.arange(recent, tokens)]
            count = budget + on_top
        else:
            candidates = reference_quest_select(k, q, budget * refine, 16, per_query_head)
            always = np.arange(16 * (tokens // 16), tokens)
            count = budget
        np.testing.assert_array_equal(recall.last_candidates, candidates)
        selection = reference_refine(candidates, always, k, q, count, per_query_head)
        np.testing.assert_array_equal(recall.last_selection, selection)
        assert np.isin(always, selection).all()
        expected, _, _ = reference.decode_attention(q, k, v, indices=selection)
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
        stats = recall.last_step
        assert stats["candidates"] == candidates.size
        assert stats["hits"] + stats["loaded"] == stats["selected"]


def reference_adaptive_split(
    candidates, always, keys, q, count, per_query_head, floor, softcap=None
):
    """AdaKV's split of rows * count recalled tokens, in float64: each row ranks its
    candidates by their softmax weights over the candidates (summed over a KV head's query
    heads; scores capped by ``softcap`` as attention caps them), the always attended tokens
    first; every row keeps its `floor` best, then the best of all rows pooled (ties to the
    lower row, then the earlier candidate)."""
    heads, dim = keys.shape[0], keys.shape[2]
    ranks = []
    for r, row in enumerate(candidates):
        head = r // (q.shape[0] // heads) if per_query_head else r
        s = reference.as64(keys[head, row]) @ row_queries(q, r, heads, per_query_head).T
        s = s / np.sqrt(dim)
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        w = np.exp(s - s.max(0))
        rank = (w / w.sum(0)).sum(1)
        rank[np.isin(row, always)] = np.inf
        ranks.append(rank)
    ranks = np.array(ranks)
    pooled = ranks.copy()
    for r, rank in enumerate(ranks):
        pooled[r, sorted(range(len(rank)), key=lambda j: (-rank[j], j))[:floor]] = np.inf
    flat = sorted(range(pooled.size), key=lambda f: (-pooled.flat[f], f))[: len(ranks) * count]
    picks = [[] for _ in ranks]
    for f in sorted(flat):
        picks[f // ranks.shape[1]].append(candidates.flat[f])
    return picks


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("fast_tier", [False, True])
@pytest.mark.parametrize("focus", [3.0, 30.0])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_adaptive_head_budgets_split_the_step_like_float64(
    rng, method, per_query_head, fast_tier, focus, softcap
):
    # Query heads that point at one topic concentrate their attention; the others spread
    # it. The rows share rows * count tokens by AdaKV's rule over their refined candidates,
    # and each row attends exactly its share. At focus 30 KV head 0's rows are held near
    # their floor. Under a softcap (Gemma 2) the split ranks the capped scores, which
    # splits the budget differently; the cap bends the focused scores without saturating
    # them (a saturated cap ties them in float32, and ties are not float64's order).
    keys, centres, _ = topic_keys(rng, heads=2, tokens=1500)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    budget, refine = 96, 3
    options = dict(per_query_head=per_query_head, fast_tier=fast_tier, refine=refine)
    if method == "clusterkv":
        options["n_clusters"] = 60
    recall = kvpack.RecallCache(budget=budget, method=method, adaptive=True, **options)
    uniform = kvpack.RecallCache(budget=budget, method=method, **options)
    recall.prefill(keys, values)
    uniform.prefill(keys, values)
    k, v = keys, values
    sizes, capped = [], False
    for step in range(3):
        q = 0.3 * rng.standard_normal((8, 32))
        focused = 2 if focus == 3.0 else 4  # query heads of KV head 0 that concentrate
        q[:focused] += focus * centres[0, step]
        q = q.astype(np.float32)
        new_k, new_v = keys[:, 200 + step], values[:, 200 + step]
        out = kvpack._core.recall_step(
            [recall._recall],
            q[None, None],
            new_k[None, :, None],
            new_v[None, :, None],
            None,
            softcap,
            None,
        )[0, 0]
        uniform.step(q, new_k, new_v)
        k = np.concatenate([k, new_k[:, None]], axis=1)
        v = np.concatenate([v, new_v[:, None]], axis=1)
        tokens = k.shape[1]
        candidates = recall.last_candidates
        np.testing.assert_array_equal(candidates, uniform.last_candidates)
        if method == "clusterkv":
            always = np.r_[np.arange(16), np.arange(1500, tokens)]
            count = budget + step + 1
        else:
            always = np.arange(16 * (tokens // 16), tokens)
            count = budget
        floor = int(0.2 * count)
        picks = reference_adaptive_split(
            candidates, always, k, q, count, per_query_head, floor, softcap
        )
        if softcap is not None:
            uncapped = reference_adaptive_split(
                candidates, always, k, q, count, per_query_head, floor
            )
            capped |= picks != uncapped
        elif focus == 30.0:  # KV head 0's rows keep about their floor, the others the rest
            half = len(picks) // 2
            assert max(map(len, picks[:half])) < floor + 5 < count < min(map(len, picks[half:]))
        selection = recall.last_selection
        rows = len(picks)
        assert selection.shape == (rows, max(map(len, picks)))
        for row, want in zip(selection, picks):
            np.testing.assert_array_equal(row[: len(want)], want)
            assert (row[len(want) :] == -1).all()
        assert sum(map(len, picks)) == rows * count  # the layer's total is the user's
        sizes += [len(p) for p in picks]
        for h in range(8):
            sel = np.array(picks[h if per_query_head else h // 4])
            want, _, _ = reference.decode_attention(
                q[h : h + 1],
                k[h // 4 : h // 4 + 1],
                v[h // 4 : h // 4 + 1],
                indices=sel[None],
                softcap=softcap,
            )
            np.testing.assert_allclose(out[h], want[0], atol=2e-5, rtol=2e-5)
        per_head = np.split(np.arange(rows), 2)  # each KV head's rows
        held = [np.unique(np.concatenate([picks[r] for r in mine])) for mine in per_head]
        assert recall.last_step["selected"] == sum(map(len, held))
    assert max(sizes) > min(sizes)  # the heads were given different shares
    assert capped or softcap is None  # the cap moved the split


def test_adaptive_recall_needs_refined_candidates():
    with pytest.raises(ValueError, match=r"adaptive.*refine >= 2"):
        kvpack.RecallCache(budget=64, method="quest", adaptive=True)


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
def test_refining_keeps_more_attention_than_the_method_alone(rng, method):
    """One KV head per query head: the refined budget holds the highest scores of a
    superset of the method's own selection, so at least as much attention."""
    keys, centres, _ = topic_keys(rng, heads=2, tokens=4000, dim=32, topics=12, run=40)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    mass, options = {}, {"n_clusters": 40} if method == "clusterkv" else {}
    for refine in (1, 4):
        recall = kvpack.RecallCache(budget=96, method=method, refine=refine, **options)
        recall.prefill(keys, values)
        mass[refine] = []
        for step in range(6):
            q = (2 * centres[:, step] + rng.standard_normal((2, 32))).astype(np.float32)
            recall.step(q, keys[:, step], values[:, step])
            k = np.concatenate([keys, keys[:, : step + 1]], axis=1)
            _, _, weights = reference.decode_attention(q, k, np.zeros_like(k))
            got = np.take_along_axis(weights, recall.last_selection, axis=1).sum(1)
            mass[refine].append(got)
    gain = np.array(mass[4]) - np.array(mass[1])
    # seen: 0.31 -> 0.54 (clusterkv), 0.28 -> 0.58 (quest)
    assert (gain >= -1e-9).all() and gain.mean() > 0.1, gain.mean()


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("refine", "per_query_head"), [(1, False), (3, False), (3, True)])
def test_coded_slow_tier_attends_the_dequantized_prompt(rng, method, bits, refine, per_query_head):
    # The prompt held as KIVI codes: the step ranks and attends the recalled tokens as the
    # float64 dequantized prompt (and the exact decoded tokens) would give them.
    keys, _, _ = topic_keys(rng, tokens=1500)
    keys = keys.astype(np.float16)
    values = rng.standard_normal(keys.shape).astype(np.float16)
    budget, group = 128, 32
    options = dict(slow_bits=bits, slow_group=group, refine=refine, per_query_head=per_query_head)
    if method == "clusterkv":
        options["n_clusters"] = 60
    recall = kvpack.RecallCache(budget=budget, method=method, **options)
    recall.prefill(keys, values)
    k, v, quantized = reference.kivi_dequantize(keys, values, bits, group=group, residual=group)
    assert quantized == 1440
    exact = kvpack.RecallCache(budget=budget, method=method, **{**options, "slow_bits": 0})
    exact.prefill(keys, values)
    for step in range(3):
        q = rng.standard_normal((8, 32)).astype(np.float32)
        new_k = rng.standard_normal((2, 32)).astype(np.float16)
        new_v = rng.standard_normal((2, 32)).astype(np.float16)
        out = recall.step(q, new_k, new_v)
        exact.step(q, new_k, new_v)
        k = np.concatenate([k, new_k[:, None]], axis=1)
        v = np.concatenate([v, new_v[:, None]], axis=1)
        selection = recall.last_selection
        if refine == 1:  # the index is the exact prompt's: the same selection
            np.testing.assert_array_equal(selection, exact.last_selection)
        else:  # the candidates too, then the budget ranked by the dequantized keys
            candidates = recall.last_candidates
            np.testing.assert_array_equal(candidates, exact.last_candidates)
            tokens = k.shape[1]
            if method == "quest":
                pinned = np.arange(16 * (tokens // 16), tokens)
                count = budget
            else:
                pinned = np.r_[np.arange(16), np.arange(1500, tokens)]
                count = budget + step + 1
            expected = reference_refine(candidates, pinned, k, q, count, per_query_head)
            np.testing.assert_array_equal(selection, expected)
        want, _, _ = reference.decode_attention(q, k, v, indices=selection)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    held = recall.nbytes
    full = keys.nbytes + values.nbytes
    assert held["fast"] == 0 and held["slow"] < exact.nbytes["slow"] - full * 0.9
    # codes of `bits` bits and two float16 per 32 values, the last 60 tokens exact
    expected_codes = full * ((bits + 1) / 16 * 1440 / 1500 + 60 / 1500)
    assert held["codes"] == pytest.approx(expected_codes, rel=1e-3)


def test_coded_slow_tier_holds_about_a_quarter_of_the_prompt(rng):
    keys = rng.standard_normal((2, 4096, 128)).astype(np.float16)
    recall = kvpack.RecallCache(budget=256, slow_bits=4)
    recall.prefill(keys, keys)
    ratio = recall.nbytes["codes"] / (2 * keys.nbytes)
    assert 0.26 < ratio < 0.29, ratio  # 4 bits + 2 float16 per 128 values, 128 tokens exact
    q = rng.standard_normal((4, 128)).astype(np.float32)
    recall.step(q, keys[:, 0], keys[:, 0])
    stats = recall.last_step
    # A token of the codes loads 2 x 64 bytes of codes and its value range; the prompt's
    # exact tail and the new token their float16 rows.
    coded = int((recall.last_selection < 4096 - 128).sum())
    exact = stats["loaded"] - coded
    assert coded > 0 and exact >= 2
    assert stats["bytes_loaded"] == coded * (2 * 64 + 4) + exact * 2 * 128 * 2


@pytest.mark.parametrize("fast_tier", [False, True])
def test_recalled_clusters_stay_in_the_fast_tier(rng, fast_tier):
    keys, _, _ = topic_keys(rng)
    recall = kvpack.RecallCache(budget=256, recall_steps=1, fast_tier=fast_tier)
    recall.prefill(keys, keys)
    q = rng.standard_normal((2, 32)).astype(np.float32)
    recall.step(q, keys[:, 0], keys[:, 0])
    first = recall.last_step
    assert first["hits"] == 0 and first["loaded"] == 2 * (256 + 1)
    recall.step(q, keys[:, 1], keys[:, 1])  # same query: only the new token is missing
    second = recall.last_step
    assert second["loaded"] == 2 and second["hits"] == 2 * (256 + 1)
    assert recall.total["steps"] == 2


def test_fast_tier_must_be_a_bool():
    with pytest.raises(TypeError, match="fast_tier: expected a bool, got str"):
        kvpack.RecallCache(fast_tier="yes")


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
@pytest.mark.parametrize("recall_steps", [1, 3])
def test_attending_in_place_equals_the_fast_tier(rng, method, recall_steps):
    # Over clusterings of the decoded window, the host path (no copies) attends the same
    # tokens as the fast tier and counts the hits and loads it would have.
    keys, _, _ = topic_keys(rng, tokens=600)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    options = dict(budget=96, method=method, recall_steps=recall_steps)
    if method == "clusterkv":
        options["append_interval"] = 16
    in_place, cached = kvpack.RecallCache(**options), kvpack.RecallCache(fast_tier=True, **options)
    for recall in (in_place, cached):
        recall.prefill(keys, values)
    for step in range(40):
        q = (rng.standard_normal((8, 32)) + (step // 10)).astype(np.float32)  # some locality
        new_k = rng.standard_normal((2, 32)).astype(np.float32)
        a = in_place.step(q, new_k, new_k)
        b = cached.step(q, new_k, new_k)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(in_place.last_selection, cached.last_selection)
        assert in_place.last_step == cached.last_step
    assert 0 < in_place.total["hit_rate"] < 1


@pytest.mark.parametrize(
    "tokens, budget, expected",
    [
        (32784, 1024, 32768 // 80),  # the paper's setting: 80-token clusters
        (2064, 128, -(-12 * 2048 // 128)),  # clusters of budget/12 tokens on average
        (116, 4, 100),  # never more clusters than clustered tokens
    ],
)
def test_automatic_cluster_count_follows_the_budget(rng, tokens, budget, expected):
    keys = rng.standard_normal((1, tokens, 8)).astype(np.float32)
    recall = kvpack.RecallCache(budget=budget, iters=1)
    recall.prefill(keys, keys)
    assert recall.n_clusters == expected
    assert kvpack.RecallCache(budget=budget, method="quest").n_clusters == 0


def test_clusterkv_recovers_more_attention_than_quest(rng):
    """Topics scattered in short runs: semantic clusters beat positional pages."""
    rng = np.random.default_rng(2024)
    keys, centres, _ = topic_keys(rng, heads=2, tokens=6000, dim=64, topics=40, run=6, noise=0.5)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    budget, mass = 160, {"clusterkv": [], "quest": []}
    for trial in range(10):
        topic = rng.integers(0, 40)
        q = (1.0 * centres[:, topic] + 0.3 * rng.standard_normal((2, 64))).astype(np.float32)
        _, weights = kvpack.attention(q, keys, values, return_weights=True)
        for method in mass:
            if method == "clusterkv":
                selection = kvpack.ClusterIndex(keys, seed=trial).select(q, budget)
            else:
                selection = kvpack.QuestIndex(keys).select(q, budget)
            mass[method].append(np.take_along_axis(weights, selection, axis=1).sum(1).mean())
    clusterkv, quest = np.mean(mass["clusterkv"]), np.mean(mass["quest"])
    assert clusterkv > quest + 0.3, (clusterkv, quest)  # seen: 0.86 vs 0.36


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda k: kvpack.ClusterIndex(k, n_clusters=5000),
            ValueError,
            "n_clusters: expected at most the 984 tokens",
        ),
        (lambda k: kvpack.ClusterIndex(k, sink=-1), ValueError, "sink: expected >= 0"),
        (
            lambda k: kvpack.ClusterIndex(k, append_clusters=400),
            ValueError,
            "append_clusters: expected",
        ),
        (
            lambda k: kvpack.ClusterIndex(k).select(np.ones((3, 32), np.float32), 10),
            ValueError,
            "q: expected heads_q",
        ),
        (
            lambda k: kvpack.ClusterIndex(k).select(np.ones((2, 32), np.float32), 0),
            ValueError,
            "budget: expected >= 1",
        ),
        (
            lambda k: kvpack.ClusterIndex(k).append(np.ones((3, 32), np.float32)),
            ValueError,
            "new_keys: expected",
        ),
        (lambda k: kvpack.QuestIndex(k, page_size=0), ValueError, "page_size: expected >= 1"),
        (
            lambda k: kvpack.RecallCache(method="h2o"),
            ValueError,
            "method: expected a recall method",
        ),
        (lambda k: kvpack.RecallCache(budget=0).prefill(k, k), ValueError, "budget: expected >= 1"),
        (lambda k: kvpack.RecallCache(refine=0), ValueError, "refine: expected an int from 1 to"),
        (
            lambda k: kvpack.RecallCache(slow_bits=2).prefill(k, k),
            ValueError,
            "slow_bits: expected 0 \\(exact\\), 4 or 8, got 2",
        ),
        (
            lambda k: kvpack.RecallCache(slow_bits=4, fast_tier=True).prefill(k, k),
            ValueError,
            "fast_tier: a slow tier of codes",
        ),
        (
            lambda k: kvpack.RecallCache().step(np.ones((2, 32)), k[:, 0], k[:, 0]),
            ValueError,
            "call prefill",
        ),
        (
            lambda k: kvpack.ClusterIndex(np.where(k > 2, np.nan, k)),
            ValueError,
            "keys: contains NaN or Inf",
        ),
    ],
)
def test_rejects_bad_arguments(rng, build, error, message):
    keys, _, _ = topic_keys(rng, tokens=1000)
    with pytest.raises(error, match=message):
        build(keys)


def test_step_rejects_mismatched_token(rng):
    keys, _, _ = topic_keys(rng, tokens=500)
    recall = kvpack.RecallCache(budget=64)
    recall.prefill(keys, keys)
    q = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError, match=r"new_key: expected shape \(2, 32\)"):
        recall.step(q, np.ones((2, 16), np.float32), keys[:, 0])
    with pytest.raises(TypeError, match="expected dtype float32 like the prefill"):
        recall.step(q, keys[:, 0].astype(np.float16), keys[:, 0].astype(np.float16))


def test_step_rejects_non_finite_token(rng):
    keys, _, _ = topic_keys(rng, tokens=500)
    recall = kvpack.RecallCache(budget=64)
    recall.prefill(keys, keys)
    bad = keys[:, 0].copy()
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="new_key: contains NaN or Inf"):
        recall.step(np.ones((2, 32), np.float32), bad, keys[:, 0])
    assert recall.tokens == 500  # nothing appended


def test_decoded_window_is_attended_on_top_of_the_budget(rng):
    """Budget 128 after a 1792-token prompt: every decode step recalls 128 tokens of the
    prompt however many decoded tokens wait to be clustered (ClusterKV's reference)."""
    keys, _, _ = topic_keys(rng, tokens=1792)
    recall = kvpack.RecallCache(budget=128, iters=2)
    recall.prefill(keys, keys)
    for step in range(330):  # past the first clustering of decoded tokens, at 320
        new = rng.standard_normal((2, 32)).astype(np.float32)
        recall.step(rng.standard_normal((2, 32)).astype(np.float32), new, new)
        selection = recall.last_selection
        tokens = 1792 + step + 1
        on_top = (step + 1) % 320 or 1  # the unclustered tokens, or the own token
        assert selection.shape == (2, 128 + on_top)
        assert np.all(selection[:, -on_top:] == np.arange(tokens - on_top, tokens))
        # The rest is the budget: 128 tokens of the prompt (and of clustered decoded ones).
        assert np.all((selection < tokens - on_top).sum(axis=1) == 128)


def test_own_token_is_attended_when_it_is_clustered(rng):
    keys, _, _ = topic_keys(rng, tokens=500)
    recall = kvpack.RecallCache(budget=64, append_interval=8, append_clusters=2, iters=2)
    recall.prefill(keys, keys)
    for step in range(20):
        new = rng.standard_normal((2, 32)).astype(np.float32)
        recall.step(rng.standard_normal((2, 32)).astype(np.float32), new, new)
        assert np.all(recall.last_selection[:, -1] == 500 + step)


@pytest.mark.parametrize("fast_tier", [False, True])
def test_huge_budget_or_recall_steps_allocate_only_what_the_context_needs(rng, fast_tier):
    keys, _, _ = topic_keys(rng, tokens=400)
    for options in ({"budget": 1 << 40}, {"budget": 64, "recall_steps": 1 << 40}):
        recall = kvpack.RecallCache(iters=2, fast_tier=fast_tier, **options)
        recall.prefill(keys, keys)
        for step in range(3):
            q = rng.standard_normal((2, 32)).astype(np.float32)
            out = recall.step(q, keys[:, step], keys[:, step])
            assert np.all(np.isfinite(out))
        assert recall.last_step["hits"] + recall.last_step["loaded"] == recall.last_step["selected"]


def _recall_caches(rng, method, dtype, batch, heads=2, dim=32, **options):
    """Two identical sets of prefilled core caches, one per batch row (prompts of
    different lengths), and the prompts."""
    sets = ([], [])
    for b in range(batch):
        keys = rng.standard_normal((heads, 200 + 37 * b, dim)).astype(dtype)
        values = rng.standard_normal(keys.shape).astype(dtype)
        for caches in sets:
            cache = kvpack.RecallCache(budget=48, method=method, **options)
            cache.prefill(keys, values)
            caches.append(cache._recall)
    return sets


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("per_query_head", [False, True])
def test_recall_step_equals_a_step_per_row_and_position(rng, method, dtype, per_query_head):
    batch, fresh, heads_q, heads, dim = 3, 3, 8, 2, 32
    options = {"append_interval": 4, "append_clusters": 2, "iters": 2}
    options = options if method == "clusterkv" else {"page_size": 4}
    batched, one_by_one = _recall_caches(
        rng, method, dtype, batch, per_query_head=per_query_head, fast_tier=True, **options
    )
    for _ in range(3):  # decode steps, across clusterings of the decoded tokens
        queries = rng.standard_normal((batch, fresh, heads_q, dim)).astype(np.float32)
        # Token-major as a model's projections give them, viewed [batch, heads, new, dim].
        keys = rng.standard_normal((batch, fresh, heads, dim)).astype(dtype).transpose(0, 2, 1, 3)
        values = rng.standard_normal((batch, fresh, heads, dim)).astype(dtype).transpose(0, 2, 1, 3)
        out = kvpack._core.recall_step(batched, queries, keys, values)
        assert out.shape == (batch, fresh, heads_q, dim) and out.dtype == np.float32
        for b, cache in enumerate(one_by_one):
            for i in range(fresh):
                expected = cache.step(queries[b, i], keys[b, :, i], values[b, :, i])
                np.testing.assert_array_equal(out[b, i], expected)
            np.testing.assert_array_equal(batched[b].last_selection, cache.last_selection)
    for mine, theirs in zip(batched, one_by_one):
        assert mine.tokens == theirs.tokens and mine.total == theirs.total


RULES = {"scale": (0.3, None, False), "softcap": (0.3, 2.0, False), "sinks": (None, None, True)}
RULES["both"] = (0.3, 2.0, True)


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"refine": 2},
        {"refine": 2, "adaptive": True},
        {"per_query_head": True},
        {"fast_tier": True},
    ],
    ids=str,
)
@pytest.mark.parametrize("rules", RULES)
def test_recall_step_scales_caps_and_sinks_like_float64(rng, method, options, rules):
    # A model's own scale, Gemma 2's softcap and gpt-oss's sinks on the recalled tokens:
    # each step is float64 attention over its own selection under the same rules.
    scale, softcap, with_sinks = RULES[rules]
    heads_q, heads, dim = 8, 2, 32
    keys = rng.standard_normal((heads, 300, dim)).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    cache = kvpack.RecallCache(budget=48, method=method, **options)
    cache.prefill(keys, values)
    sinks = rng.standard_normal(heads_q).astype(np.float32) + 2 if with_sinks else None
    for _ in range(3):
        q = 3 * rng.standard_normal((1, 1, heads_q, dim)).astype(np.float32)  # capped scores
        key = rng.standard_normal((1, heads, 1, dim)).astype(np.float32)
        value = rng.standard_normal((1, heads, 1, dim)).astype(np.float32)
        out = kvpack._core.recall_step([cache._recall], q, key, value, scale, softcap, sinks)
        keys, values = np.concatenate([keys, key[0]], 1), np.concatenate([values, value[0]], 1)
        selection = cache._recall.last_selection
        expected = reference.decode_attention(
            q[0, 0], keys, values, selection, scale=scale, softcap=softcap, sinks=sinks
        )[0]
        np.testing.assert_allclose(out[0, 0], expected, rtol=2e-4, atol=2e-5)


def test_recall_step_reads_torch_views(rng):
    torch = pytest.importorskip("torch")
    batched, one_by_one = _recall_caches(rng, "clusterkv", np.float16, 2)
    queries = torch.randn(2, 1, 4, 32)
    keys = torch.randn(2, 1, 2, 32, dtype=torch.float16).transpose(1, 2)
    values = torch.randn(2, 1, 2, 32, dtype=torch.float16).transpose(1, 2)
    out = kvpack._core.recall_step(batched, queries, keys, values)
    for b, cache in enumerate(one_by_one):
        expected = cache.step(queries[b, 0].numpy(), keys[b, :, 0].numpy(), values[b, :, 0].numpy())
        np.testing.assert_array_equal(out[b, 0], expected)


def test_recall_step_rejects_bad_arguments(rng):
    caches, _ = _recall_caches(rng, "clusterkv", np.float16, 2)
    queries = np.zeros((2, 1, 4, 32), np.float32)
    keys = np.zeros((2, 2, 1, 32), np.float16)
    step = kvpack._core.recall_step
    fresh = kvpack._core.RecallCache(16, kvpack.methods.ClusterKV())
    cases = [
        (lambda: step(caches[:1], queries, keys, keys), ValueError, "caches: expected one per"),
        (lambda: step(caches[0], queries, keys, keys), TypeError, "caches: expected a sequence"),
        (lambda: step([caches[0], "x"], queries, keys, keys), TypeError, r"caches\[1\]: expected"),
        (lambda: step([caches[0], fresh], queries, keys, keys), ValueError, "prefill"),
        (lambda: step(caches, queries[0], keys, keys), ValueError, "queries: expected 4"),
        (lambda: step(caches, queries[:, :, ::2], keys, keys), ValueError, "C-contiguous"),
        (
            lambda: step(caches, queries, keys[:, :, :0], keys[:, :, :0]),
            ValueError,
            "keys: expected shape",
        ),
        (lambda: step(caches, queries, keys, keys[:1]), ValueError, "values: expected shape"),
        (lambda: step(caches, queries, keys[:, :1], keys[:, :1]), ValueError, "keys: expected"),
        (
            lambda: step(caches, np.zeros((2, 1, 3, 32), np.float32), keys, keys),
            ValueError,
            "multiple of heads_kv",
        ),
        (
            lambda: step(caches, queries, keys.astype(np.float32), keys.astype(np.float32)),
            TypeError,
            r"keys/values: expected dtype float16 like the prefill of caches\[0\]",
        ),
        (lambda: step(caches, queries, keys, keys.astype(np.float32)), TypeError, "values"),
        (lambda: step(caches, queries, keys.astype(np.int8), keys), TypeError, "keys"),
        (
            lambda: step(caches, queries, np.full_like(keys, np.nan), keys),
            ValueError,
            r"keys\[0, :, 0\]: contains NaN",
        ),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert all(cache.tokens == 200 + 37 * b for b, cache in enumerate(caches))
