"""kvpack.methods: one parameter object per method, defaults from the core, read everywhere."""

import copy
import pickle

import numpy as np
import pytest

import kvpack
from kvpack import methods


def test_registry_lists_every_method_once_by_kind():
    assert list(methods.REGISTRY) == list(methods.names())
    assert methods.names("compress") == kvpack.METHODS
    assert methods.names("compress") == (
        "full",
        "streaming_llm",
        "h2o",
        "snapkv",
        "keydiff",
        "expected_attention",
        "cam",
        "kvmerger",
    )
    assert methods.names("recall") == ("clusterkv", "clusterkv_refined", "quest")
    assert methods.names("quantize") == ("kivi",)
    for name, cls in methods.REGISTRY.items():
        assert cls.name == name
        assert getattr(methods, cls.__name__) is cls
        assert tuple(cls().as_dict()) == cls.params
    with pytest.raises(ValueError, match="kind: expected one of"):
        methods.names("evict")


def test_defaults_are_the_documented_ones():
    assert methods.StreamingLLM().sinks == 4
    assert methods.H2O().recent_ratio == 0.5
    assert (methods.SnapKV().window, methods.SnapKV().kernel) == (32, 5)
    assert (methods.CaM().sinks, methods.CaM().merge_window) == (4, 32)
    merger = methods.KVMerger()
    assert (merger.protect_recent, merger.protect_heavy, merger.sigma) == (None, None, 5.0)
    cluster = methods.ClusterKV()
    assert (cluster.n_clusters, cluster.sink, cluster.window, cluster.iters) == (None, 16, 0, 20)
    assert (cluster.append_interval, cluster.append_clusters, cluster.fast_tier) == (320, 8, False)
    assert (methods.Quest().page_size, methods.Quest().recall_steps) == (16, 1)
    assert (methods.KIVI().bits, methods.KIVI().group) == (2, 32)


@pytest.mark.parametrize("name", list(methods.REGISTRY))
def test_objects_copy_compare_and_pickle_by_value(name):
    cls = methods.REGISTRY[name]
    default = cls()
    for other in (pickle.loads(pickle.dumps(default)), copy.deepcopy(default), cls()):
        assert other == default and other is not default
    assert repr(default).startswith(f"{cls.__name__}(")
    assert eval(repr(default), {cls.__name__: cls}) == default
    if cls.params:
        first = cls.params[0]
        changed = default.replace(**{first: getattr(default, first)})
        assert changed == default
    assert default != object()


def test_replace_and_resolve():
    snap = methods.SnapKV(window=16)
    assert snap.replace(kernel=7) == methods.SnapKV(window=16, kernel=7)
    assert snap.window == 16  # replace copies
    assert methods.resolve("snapkv", window=16) == snap
    assert methods.resolve(snap) is snap
    assert methods.resolve(snap, kernel=3) == methods.SnapKV(window=16, kernel=3)
    snap.window = 8  # properties set through the same checks
    assert snap.window == 8
    with pytest.raises(ValueError, match="window: expected an int from 1"):
        snap.window = 0
    with pytest.raises(ValueError, match="method: expected one of full, streaming_llm"):
        methods.resolve("snap")
    with pytest.raises(TypeError, match="method: expected a method name or a kvpack"):
        methods.resolve(3)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: methods.SnapKV(kernel=4), ValueError, "kernel: expected an odd int >= 1"),
        (lambda: methods.SnapKV(window=2.5), TypeError, "window: expected an int, got float"),
        (lambda: methods.SnapKV(window=True), TypeError, "window: expected an int, got bool"),
        (lambda: methods.SnapKV(sinks=4), TypeError, "sinks: method 'snapkv' does not take"),
        (lambda: methods.SnapKV(16), TypeError, "SnapKV takes its parameters by keyword"),
        (lambda: methods.Full(window=1), TypeError, "it takes no parameters"),
        (lambda: methods.H2O(recent_ratio=1.5), ValueError, "recent_ratio: expected a share"),
        (lambda: methods.H2O(recent_ratio="0.5"), TypeError, "recent_ratio: expected a number"),
        (lambda: methods.StreamingLLM(sinks=-1), ValueError, "sinks: expected an int from 0"),
        (lambda: methods.CaM(merge_window=0), ValueError, "merge_window: expected an int from 1"),
        (lambda: methods.KVMerger(sigma=0.0), ValueError, "sigma: expected a positive width"),
        (lambda: methods.KVMerger(protect_heavy=-0.1), ValueError, "protect_heavy: expected"),
        (lambda: methods.ClusterKV(fast_tier=1), TypeError, "fast_tier: expected a bool"),
        (lambda: methods.ClusterKV(init="kmeans"), ValueError, "init: expected 'kmeans"),
        (lambda: methods.ClusterKV(iters=2**40), ValueError, "iters: expected an int from 1"),
        (lambda: methods.Quest(n_clusters=8), TypeError, "n_clusters: method 'quest'"),
        (lambda: methods.KIVI(bits=3), ValueError, "bits: expected 2, 4 or 8"),
    ],
)
def test_bad_parameters_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_name_and_its_object_compress_alike(rng):
    keys = rng.standard_normal((2, 200, 16)).astype(np.float32)
    queries = rng.standard_normal((4, 40, 16)).astype(np.float32)
    by_name = kvpack.compress(keys, keys, "snapkv", 50, queries=queries, window=8)
    by_object = kvpack.compress(keys, keys, methods.SnapKV(window=8), 50, queries=queries)
    default = kvpack.compress(keys, keys, "snapkv", 50, queries=queries)
    np.testing.assert_array_equal(by_name.positions, by_object.positions)
    assert by_object.method == "snapkv"
    assert not np.array_equal(by_name.positions, default.positions)  # the window is read
    with pytest.raises(ValueError, match="method: expected a compression method"):
        kvpack.compress(keys, keys, methods.ClusterKV(), 50)
    with pytest.raises(ValueError, match="method: expected a recall method"):
        kvpack.RecallCache(64, methods.SnapKV())
    with pytest.raises(ValueError, match="method: expected 'streaming_llm' or 'h2o'"):
        kvpack.EvictionCache(methods.CaM(), 32)


def test_recall_objects_reach_the_recall_store(rng):
    keys = rng.standard_normal((2, 600, 16)).astype(np.float32)
    by_object = kvpack.RecallCache(64, methods.ClusterKV(n_clusters=12, iters=3))
    by_name = kvpack.RecallCache(64, "clusterkv", n_clusters=12, iters=3)
    quest = kvpack.RecallCache(64, methods.Quest(page_size=8))
    for recall in (by_object, by_name, quest):
        recall.prefill(keys, keys)
    assert by_object.n_clusters == by_name.n_clusters == 12
    assert quest.method == methods.Quest(page_size=8)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_array_equal(
        by_object.step(q, keys[:, 0], keys[:, 0]), by_name.step(q, keys[:, 0], keys[:, 0])
    )
