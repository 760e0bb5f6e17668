"""The tiered store: codec blobs against NumPy references, tiers, placement, reliability."""

import errno
import itertools
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import kvpack
from kvpack import _core
from kvpack.eval.trace import replay, zipf_trace
from kvpack.store import decode, encode

import reference as ref
from conftest import KV_DTYPES

xxhash = pytest.importorskip("xxhash")

MB = 1 << 20


def TieredStore(*args, **kwargs):
    """kvpack.TieredStore with fixed decode costs ('none' free, 1 GB/s for the others)
    unless a test gives its own: with the read bandwidths each test gives, the adaptive
    placement depends on the entries alone, never on how busy the machine is."""
    if kwargs.get("policy", "adaptive") == "adaptive" and "decode_bandwidths" not in kwargs:
        codecs = kwargs.get("codecs") or kvpack.store.CODECS
        kwargs["decode_bandwidths"] = [np.inf if c == "none" else 1e9 for c in codecs]
    return kvpack.TieredStore(*args, **kwargs)


def context(rng, layers=2, heads=2, tokens=200, dim=32, dtype=np.float32, shift=0.0):
    return [
        (
            (rng.standard_normal((heads, tokens, dim)) + shift).astype(dtype),
            (rng.standard_normal((heads, tokens, dim)) + shift).astype(dtype),
        )
        for _ in range(layers)
    ]


def probes(rng, kv, heads_q=4, n=8):
    return [rng.standard_normal((heads_q, n, k.shape[2])).astype(np.float32) for k, _ in kv]


def assert_same(kv_a, kv_b):
    assert len(kv_a) == len(kv_b)
    for (ka, va), (kb, vb) in zip(kv_a, kv_b):
        assert ka.dtype == kb.dtype and ka.shape == kb.shape
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)


def stored(kv_bytes):
    return (kv_bytes + 4095) // 4096 * 4096


# ---- checksum and codecs -------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 4, 7, 8, 31, 32, 33, 100, 240, 241, 4096, 100003])
def test_checksums_match_reference(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for seed in (0, 1, 2**63 + 5):
        assert _core.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed=seed)
        assert _core.xxh3(data, seed) == xxhash.xxh3_64_intdigest(data, seed=seed)


def _forged(blob: bytes, edit) -> bytes:
    """``blob`` with ``edit(bytearray)`` applied, its checksum made valid again: what anyone
    who can write to a shared tier can plant (a checksum is no MAC). Version 1 blobs carry
    XXH64 checksums, later ones XXH3."""
    data = bytearray(blob)
    edit(data)
    digest = xxhash.xxh64_intdigest if _u(data, 8, 4) == 1 else xxhash.xxh3_64_intdigest
    seed = digest(bytes(data[:40]))
    data[40:48] = digest(bytes(data[48:]), seed=seed).to_bytes(8, "little")
    return bytes(data)


def _as_format(blob: bytes, version: int) -> bytes:
    """A blob of format 3 as format 2 (no entry version after the payloads) or 1 (that, with
    an XXH64 checksum) wrote it."""
    data = bytearray(blob)
    last = _record(data, _u(data, 28, 4) - 1)
    end = _u(data, last + 16, 8) + _u(data, last + 24, 8)
    del data[end:]
    _put_u(data, 32, 8, end)
    return _forged(bytes(data), lambda d: _put_u(d, 8, 4, version))


@pytest.mark.parametrize("codec", ["none", "kivi-4", "h2o-0.5"])
def test_blobs_of_formats_1_and_2_are_still_read(rng, codec):
    kv = context(rng, tokens=160)
    blob = encode(kv, codec, key="old")
    assert _u(blob, 8, 4) == 3 and _u(blob, 40, 8) == xxhash.xxh3_64_intdigest(
        blob[48:], seed=xxhash.xxh3_64_intdigest(blob[:40])
    )
    for a, b in zip(decode(_as_format(blob, 2)).kv, decode(blob).kv):
        assert_same([a], [b])
    old = _as_format(blob, 1)  # as version 1 wrote it: XXH64
    for a, b in zip(decode(old).kv, decode(blob).kv):
        assert_same([a], [b])
    flipped = bytearray(old)
    flipped[len(old) // 2] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        decode(bytes(flipped))


def test_blobs_of_format_2_are_read_and_older_than_any_put(tmp_path):
    def entry(value):
        return [(np.full((2, 64, 32), value, np.float32),) * 2]

    args = dict(policy="lru", bandwidths=[1e10, 1e9])
    old = _as_format(encode(entry(7.0), "none", key="k"), 2)
    padded = old + bytes(-len(old) % 4096)  # as a store of format 2 left it on disk
    with TieredStore(0, tmp_path, 64 * MB, **args) as store:
        store.put("k", entry(1.0))
        (path,) = tmp_path.glob("*.kvb")
        path.write_bytes(padded)
    with TieredStore(0, tmp_path, 64 * MB, **args) as store:  # found on disk: served
        assert store.get("k").kv[0][0][0, 0, 0] == 7.0
        store.put("k", entry(8.0))
        path.write_bytes(padded)  # put back over a newer version: refused, left in place
        with pytest.raises(KeyError):
            store.get("k")
        assert store.stats()["stale"] == 1 and path.read_bytes() == padded


def _record(data, layer=0):
    """Offset of a layer record: after the 64-byte header and the key, 8-byte aligned."""
    key_bytes = int.from_bytes(data[48:52], "little")
    return (64 + key_bytes + 7) // 8 * 8 + 32 * layer


def _put_u(data, at, width, value):
    data[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


HOSTILE = {
    # offset + bytes wraps past 2^64 onto memory before the buffer
    "wrapping offset": lambda d: _put_u(d, _record(d) + 16, 8, -(8 << 20)),
    "offset past the end": lambda d: _put_u(d, _record(d) + 16, 8, len(d) + 64),
    "unaligned offset": lambda d: _put_u(d, _record(d) + 16, 8, _u(d, _record(d) + 16, 8) + 4),
    # heads x tokens x dim x 4 overflows to a small number
    "overflowing shape": lambda d: (
        _put_u(d, _record(d), 4, 1 << 31),
        _put_u(d, _record(d) + 4, 4, 1 << 31),
        _put_u(d, _record(d) + 12, 4, 1 << 2),
    ),
    "huge shape": lambda d: _put_u(d, _record(d) + 4, 4, (1 << 32) - 1),
}


def _u(data, at, width):
    return int.from_bytes(data[at : at + width], "little")


@pytest.mark.parametrize("codec", ["none", "kivi-2", "h2o-0.5"])
@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_forged_layer_table_is_refused_not_read(rng, codec, attack):
    kv = context(rng, tokens=64)
    blob = _forged(encode(kv, codec, key="victim"), HOSTILE[attack])
    with pytest.raises(ValueError, match="blob: not a valid kvpack blob"):
        decode(blob)


def test_forged_positions_and_counts_are_refused(rng):
    kv = context(rng, tokens=64)
    blob = encode(kv, "h2o-0.5", key="k")
    heads, tokens, dim = 2, 32, 32
    offset = _u(blob, _record(blob) + 16, 8)
    positions = offset + 2 * heads * tokens * dim * 4  # after keys and values (float32)
    counts = positions + 4 * heads * tokens
    edits = {
        "out of range": lambda d: _put_u(d, positions, 4, 64),
        "negative": lambda d: _put_u(d, positions, 4, -1),
        "not ascending": lambda d: _put_u(d, positions + 4, 4, _u(d, positions, 4)),
        "zero count": lambda d: _put_u(d, counts, 4, 0),
    }
    for edit in edits.values():
        with pytest.raises(ValueError, match=r"positions|counts"):
            decode(_forged(blob, edit))
    assert decode(blob).positions[0].shape == (heads, tokens)  # the unforged blob is fine


def test_forged_quantized_shape_is_refused_before_allocating(rng):
    # The payload's own header (bits, dtype, group, residual, heads, tokens, dim, quantized)
    # claims 2^20 heads of 2^32 tokens: refused by size, never allocated (was MemoryError).
    blob = encode(context(rng, tokens=64), "kivi-2", key="k")
    payload = _u(blob, _record(blob) + 16, 8)
    huge = _forged(
        blob,
        lambda d: (
            _put_u(d, payload + 24, 8, (1 << 20) - 1),
            _put_u(d, payload + 32, 8, 2**32 - 1),
        ),
    )
    with pytest.raises(ValueError, match="quantized payload"):
        decode(huge)
    # A group of 2^40 tokens for a cache too short to have any: scratch was sized by it.
    wide = _forged(blob, lambda d: _put_u(d, payload + 8, 8, 1 << 40))
    with pytest.raises(ValueError, match="quantized payload"):
        decode(wide)


def test_forged_layers_sharing_a_payload_are_refused(rng):
    # Layer records pointing at one payload would let a blob expand many times over.
    blob = encode(context(rng, tokens=64), "kivi-2", key="k")
    first = _record(blob)
    shared = _forged(
        blob, lambda d: d.__setitem__(slice(first + 32, first + 64), d[first : first + 32])
    )
    with pytest.raises(ValueError, match="layer table"):
        decode(shared)


def test_forged_blob_in_a_tier_is_a_counted_miss(rng, tmp_path):
    kv = context(rng, tokens=64)
    with TieredStore(0, tmp_path, 64 * MB, policy="lru", bandwidths=[1e10, 1e9]) as store:
        store.put("victim", kv)
        (path,) = tmp_path.glob("*.kvb")
        path.write_bytes(_forged(path.read_bytes(), HOSTILE["wrapping offset"]))
        with pytest.raises(KeyError):
            store.get("victim")
        stats = store.stats()
        assert stats["corrupt"] == 1 and "victim" not in store


def test_secret_signs_entries_and_refuses_unsigned_ones(rng, tmp_path):
    # A shared SSD directory: a writer without the secret (or with another) replaces the
    # victim's file with a well-formed, checksummed blob of its own for the same key.
    victim, planted = context(rng, tokens=64), context(rng, tokens=64)
    args = dict(policy="lru", bandwidths=[1e10, 1e9])
    with TieredStore(0, tmp_path, 64 * MB, secret="s3cret", **args) as store:
        store.put("victim", victim)
        store.put("other", planted)
        assert_same(store.get("victim").kv, victim)
    with TieredStore(0, tmp_path, 64 * MB, secret=b"s3cret", **args) as store:  # reopened
        assert_same(store.get("victim").kv, victim)
    files = {p.read_bytes()[64:65]: p for p in tmp_path.glob("*.kvb")}
    signed_other = files[b"o"].read_bytes()
    for attacker in (None, "guess"):
        with TieredStore(0, tmp_path / "attacker", 64 * MB, secret=attacker, **args) as other:
            other.put("victim", planted)
            (forged,) = (tmp_path / "attacker").glob("*.kvb")
            files[b"v"].write_bytes(forged.read_bytes())
        shutil.rmtree(tmp_path / "attacker")
        with TieredStore(0, tmp_path, 64 * MB, secret="s3cret", **args) as store:
            with pytest.raises(KeyError):
                store.get("victim")
            assert store.stats()["unauthenticated"] == 1 and "victim" not in store
            assert_same(store.get("other").kv, planted)
    # A signed blob of another key moved under the victim's name: refused too.
    files[b"v"].write_bytes(signed_other)
    with TieredStore(0, tmp_path, 64 * MB, secret="s3cret", **args) as store:
        assert "victim" not in store  # indexed by the key inside it, which is "other"
    # Without a secret a store serves any well-formed blob, as before.
    with TieredStore(0, tmp_path, 64 * MB, **args) as store:
        assert_same(store.get("other").kv, planted)


def test_secret_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="secret: expected at least one byte"):
        TieredStore(1 * MB, secret="")
    with pytest.raises(TypeError, match="secret: expected str or bytes, got int"):
        TieredStore(1 * MB, secret=42)


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_codec_none_round_trip(rng, dtype):
    kv = context(rng, dtype=dtype)
    out = decode(encode(kv, "none", key="ctx"))
    assert out.codec == "none" and out.positions is None
    assert_same(out.kv, kv)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_codec_kivi_matches_reference(rng, bits, dtype):
    kv = context(rng, tokens=300, dtype=dtype)
    out = decode(encode(kv, f"kivi-{bits}"))
    for (k, v), (dk, dv) in zip(kv, out.kv):
        rk, rv, n = ref.kivi_dequantize(k, v, bits, group=32, residual=128)
        assert n == 160 and dk.dtype == dtype
        tol = 1e-6 if dtype == np.float32 else 1e-3
        np.testing.assert_allclose(dk.astype(np.float32), rk.astype(dtype), rtol=tol, atol=tol)
        np.testing.assert_allclose(dv.astype(np.float32), rv.astype(dtype), rtol=tol, atol=tol)


def test_kivi_blob_is_smaller(rng):
    kv = context(rng, tokens=1024, dim=128, dtype=np.float16)
    sizes = {c: len(encode(kv, c)) for c in ("none", "kivi-8", "kivi-4", "kivi-2")}
    assert sizes["none"] > sizes["kivi-8"] > sizes["kivi-4"] > sizes["kivi-2"]
    assert sizes["none"] / sizes["kivi-2"] > 3.0  # the 128 latest tokens stay float16


@pytest.mark.parametrize(
    "codec,method",
    [
        ("streaming_llm-0.5", "streaming_llm"),
        ("snapkv-0.25", "snapkv"),
        ("h2o-0.5", "h2o"),
        ("kvmerger-0.5", "kvmerger"),
    ],
)
def test_codec_dropping_matches_compress(rng, codec, method):
    kv = context(rng, tokens=240)
    q = probes(rng, kv)
    out = decode(encode(kv, codec, probe_queries=q))
    rate = float(codec.split("-")[1])
    for layer, ((k, v), (dk, dv)) in enumerate(zip(kv, out.kv)):
        expected = kvpack.compress(k, v, method, rate, queries=q[layer])
        np.testing.assert_array_equal(dk, expected.keys)
        np.testing.assert_array_equal(dv, expected.values)
        np.testing.assert_array_equal(out.positions[layer], expected.positions)
        np.testing.assert_array_equal(out.counts[layer], expected.counts)
        assert dk.shape[1] == round(rate * 240)


def test_codec_without_probes_uses_last_keys(rng):
    kv = context(rng, tokens=150)
    out = decode(encode(kv, "h2o-0.5"))
    k, v = kv[0]
    expected = kvpack.compress(k, v, "h2o", 0.5, queries=np.ascontiguousarray(k[:, -32:]))
    np.testing.assert_array_equal(out.positions[0], expected.positions)


def test_blob_detects_every_flipped_byte(rng):
    kv = context(rng, layers=2, tokens=40, dim=8)
    blob = bytearray(encode(kv, "kivi-4", key="flip"))
    for at in list(range(0, 64)) + list(range(64, len(blob), 97)):
        bad = bytearray(blob)
        bad[at] ^= 0x10
        with pytest.raises(ValueError, match="corrupt"):
            decode(bytes(bad))
    with pytest.raises(ValueError, match="corrupt"):
        decode(bytes(blob[:-1]))
    assert _core.decode_blob(bytes(blob))["key"] == "flip"


def test_codec_names_and_errors(rng):
    assert _core.parse_codec("h2o-0.50") == "h2o-0.5"
    kv = context(rng, tokens=16)
    for bad in ("kivi-3", "zip", "h2o-0", "h2o-1.5", "h2o-x", "snapkv"):
        with pytest.raises(ValueError, match="codec"):
            encode(kv, bad)
    with pytest.raises(ValueError, match="kv"):
        encode([], "none")
    with pytest.raises(ValueError, match="dtype of layer 0"):
        encode([kv[0], (kv[1][0].astype(np.float16), kv[1][1].astype(np.float16))], "none")
    with pytest.raises(ValueError, match="keys"):
        bad_keys = kv[0][0].copy()
        bad_keys[0, 3, 1] = np.nan
        encode([(bad_keys, kv[0][1])], "none")
    with pytest.raises(ValueError, match="probe_queries"):
        encode(kv, "h2o-0.5", probe_queries=[np.zeros((3, 4, 32), np.float32)] * 2)


# ---- placement -----------------------------------------------------------------


def brute_force(options, capacities):
    best, best_choice = -np.inf, None
    for choice in itertools.product(*[range(-1, len(o)) for o in options]):
        used = [0] * len(capacities)
        total, evicted = 0.0, 0
        for item, c in zip(options, choice):
            if c < 0:
                evicted += 1
                continue
            tier, size, utility = item[c]
            used[tier] += size
            total += utility
        if any(u > cap for u, cap in zip(used, capacities)):
            continue
        score = (-evicted, total)
        if best_choice is None or score > best:
            best, best_choice = score, choice
    return best


def test_placement_respects_capacities_and_is_near_optimal():
    rng = np.random.default_rng(7)
    ratios, extra_evictions = [], 0
    for _ in range(150):
        n = int(rng.integers(1, 5))
        capacities = [int(rng.integers(0, 12)), int(rng.integers(2, 20))]
        options = []
        for _ in range(n):
            sizes = sorted(rng.choice(np.arange(1, 9), size=3, replace=False))[::-1]
            quality = [1.0, 0.8, 0.5]
            item = []
            for tier, delay in ((0, 0.05), (1, 0.3)):
                for size, q in zip(sizes, quality):
                    item.append((tier, int(size), float(q - delay * size / 8)))
            options.append(item)
        choice = _core.place(options, [1.0] * n, capacities)
        used = [0, 0]
        total, evicted = 0.0, 0
        for item, c in zip(options, choice):
            if c < 0:
                evicted += 1
                continue
            used[item[c][0]] += item[c][1]
            total += item[c][2]
        assert used[0] <= capacities[0] and used[1] <= capacities[1]
        best_evicted, best_total = brute_force(options, capacities)
        extra_evictions += evicted > -best_evicted
        if evicted == -best_evicted and best_total > 0:
            ratios.append(total / best_total)
    # The greedy is a heuristic: it rarely evicts more than it must (an item left over
    # when the tiers' remainders are fragmented), and is close to the optimum otherwise.
    assert extra_evictions <= 5
    assert np.mean(ratios) > 0.9
    assert np.quantile(ratios, 0.1) > 0.7


def test_placement_evicts_lowest_priority_first():
    options = [[(0, 6, 1.0)], [(0, 6, 1.0)], [(0, 6, 1.0)]]
    assert _core.place(options, [3.0, 1.0, 2.0], [12]) == [0, -1, 0]


# ---- the store -----------------------------------------------------------------


def test_dram_round_trip_and_errors(rng):
    kv = context(rng)
    with TieredStore(8 * MB, bandwidths=[1e10]) as store:
        key = store.put("a", kv)
        assert key == "a" and "a" in store and store.where("a") == ("dram", "none")
        got = store.get("a")
        assert got.tier == "dram" and got.codec == "none" and got.quality == 1.0
        assert_same(got.kv, kv)
        got.kv[0][0][...] = 0  # the caller's copy: the store's entry is unchanged
        assert_same(store.get("a").kv, kv)
        with pytest.raises(KeyError):
            store.get("b")
        assert store.delete("a") and not store.delete("a") and "a" not in store
        stats = store.stats()
        assert stats["tiers"]["dram"]["hits"] == 2 and stats["misses"] == 1
        assert stats["tiers"]["dram"]["bytes"] == 0
    with pytest.raises(ValueError, match="closed"):
        store.get("a")
    with pytest.raises(ValueError, match="policy"):
        TieredStore(MB, policy="fifo")
    with pytest.raises(ValueError, match="dram_bytes"):
        TieredStore(-1)
    with pytest.raises(ValueError, match="ssd_dir"):
        TieredStore(MB, ssd_bytes=MB)
    with pytest.raises(ValueError, match="redis_url"):
        TieredStore(MB, redis_url="http://x")
    with pytest.raises(ValueError, match="codecs"):
        TieredStore(MB, codecs=["kivi-2"], bandwidths=[1e10])
    with pytest.raises(ValueError, match="codecs"):
        TieredStore(MB, codecs=[], bandwidths=[1e10])
    with pytest.raises(ValueError, match="bandwidths"):
        TieredStore(MB, bandwidths=[1e10, 1e9])


def test_ssd_capacity_beyond_the_free_disk_is_refused(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ValueError, match=r"ssd_bytes: .* bytes free \(disk full"):
        TieredStore(MB, tmp_path / "store", free + (1 << 40))
    with pytest.raises(ValueError, match="ssd_bytes: "):
        TieredStore(MB, tmp_path / "store", np.int64(free + (1 << 40)))
    with pytest.raises(ValueError, match=r"ssd_dir: .* is not a directory"):
        (tmp_path / "file").write_bytes(b"x")
        TieredStore(MB, tmp_path / "file", MB)
    with TieredStore(MB, tmp_path / "store", MB, bandwidths=[1e10, 1e9]) as store:
        assert store.stats()["tiers"]["ssd"]["capacity"] == MB  # room enough: opens


def test_content_key(rng):
    kv = context(rng, tokens=20)
    with TieredStore(MB, bandwidths=[1e10]) as store:
        key = store.put(np.array([5, 6, 7]), kv)
        assert key == kvpack.context_key([5, 6, 7]) and [5, 6, 7] in store
        assert_same(store.get([5, 6, 7]).kv, kv)


def test_measured_quality_matches_numpy(rng):
    kv = context(rng, layers=2, tokens=300)
    q = probes(rng, kv)
    none_bytes = stored(len(encode(kv, "none", key="x")))
    # DRAM too small for the uncompressed entry: the adaptive policy must compress.
    with TieredStore(
        none_bytes - 4096, codecs=["none", "kivi-4"], bandwidths=[1e10], decode_bandwidths=1e9
    ) as s:
        s.put("x", kv, probe_queries=q)
        got = s.get("x")
    assert got.codec == "kivi-4" and got.tier == "dram"
    errors = []
    for layer, ((k, v), (dk, dv)) in enumerate(zip(kv, got.kv)):
        for i in range(q[layer].shape[1]):
            qi = q[layer][:, i]
            exact = ref.decode_attention(qi, k, v)[0]
            approx = ref.decode_attention(qi, dk, dv)[0]
            errors.append(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
    assert got.quality == pytest.approx(1 - np.mean(errors), abs=1e-5)


def test_quality_function_replaces_measurement(rng):
    kv = context(rng, tokens=200)
    calls = []

    def quality(original, decoded):
        calls.append(decoded.codec)
        return 1.0 if decoded.codec in ("none", "h2o-0.5") else 0.0

    size = stored(len(encode(kv, "h2o-0.5", key="k")))
    codecs = ["none", "kivi-2", "h2o-0.5"]
    with TieredStore(size, codecs=codecs, bandwidths=[1e10], decode_bandwidths=1e9) as store:
        store.put("k", kv, quality=quality)
        assert calls == codecs
        assert store.where("k") == ("dram", "h2o-0.5")
        assert store.get("k").quality == 1.0


def test_adaptive_keeps_everything_lossless_when_it_fits(rng):
    # Fixed read and decode costs ('none' decodes for free, as it copies nothing): the
    # placement cannot depend on the machine's load.
    free_none = [np.inf] + [1e9] * (len(kvpack.store.CODECS) - 1)
    with TieredStore(64 * MB, bandwidths=[1e10], decode_bandwidths=free_none) as store:
        for i in range(4):
            store.put(f"c{i}", context(rng))
        assert all(store.where(f"c{i}") == ("dram", "none") for i in range(4))


def test_cost_model_decides_the_codec(rng):
    """utility = alpha x quality - (bytes / read bandwidth + bytes / decode bandwidth):
    reading at 1 MB/s favours the smaller KIVI-4 entry, until decoding it costs more."""
    kv = context(rng, tokens=256)
    q = probes(rng, kv)
    codecs = ["none", "kivi-4"]
    sizes = [stored(len(encode(kv, c, key="k", probe_queries=q))) for c in codecs]

    def placed(decode_bandwidths):
        with TieredStore(
            64 * MB, codecs=codecs, bandwidths=[1e6], decode_bandwidths=decode_bandwidths
        ) as store:
            store.put("k", kv, probe_queries=q)
            quality = [1.0, _kivi4_quality(kv, q)]
            utility = [
                0.1 * quality[i] - sizes[i] / 1e6 - sizes[i] / decode_bandwidths[i]
                for i in range(2)
            ]
            return store.where("k")[1], codecs[int(np.argmax(utility))]

    for decode_bandwidths in ([np.inf, np.inf], [np.inf, 1e5]):
        chosen, expected = placed(decode_bandwidths)
        assert chosen == expected
    assert placed([np.inf, np.inf])[0] == "kivi-4" and placed([np.inf, 1e5])[0] == "none"
    for bad in ([1e9, 1e9, 1e9], [1e9, 0.0], [np.nan], []):
        with pytest.raises(ValueError, match="decode_bandwidths"):
            TieredStore(MB, codecs=codecs, bandwidths=[1e10], decode_bandwidths=bad)


def _kivi4_quality(kv, q):
    """KIVI-4's quality as the store measured it: 1 - mean relative attention error."""
    got = decode(encode(kv, "kivi-4", key="k", probe_queries=q))
    errors = []
    for layer, ((k, v), (dk, dv)) in enumerate(zip(kv, got.kv)):
        for i in range(q[layer].shape[1]):
            exact = ref.decode_attention(q[layer][:, i], k, v)[0]
            approx = ref.decode_attention(q[layer][:, i], dk, dv)[0]
            errors.append(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
    return 1 - np.mean(errors)


def test_adaptive_recompresses_older_entries(rng, tmp_path):
    kvs = [context(rng, tokens=256) for _ in range(6)]
    size = stored(len(encode(kvs[0], "none", key="c0")))
    with TieredStore(
        3 * size,
        tmp_path,
        2 * size,
        codecs=["none", "kivi-4", "kivi-2"],
        bandwidths=[1e10, 1e8],
        decode_bandwidths=1e9,
    ) as store:
        for i, kv in enumerate(kvs):
            store.put(f"c{i}", kv)
            stats = store.stats()
            for tier in stats["tiers"].values():
                assert tier["bytes"] <= tier["capacity"]
        stats = store.stats()
        assert stats["recompressions"] > 0 and stats["evictions"] == 0
        for i, kv in enumerate(kvs):  # every entry still served, within its codec's error
            got = store.get(f"c{i}")
            if got.codec == "none":
                assert_same(got.kv, kv)
            else:
                assert got.quality < 1.0


def test_lru_demotes_and_promotes(rng, tmp_path):
    kvs = [context(rng) for _ in range(4)]
    size = stored(len(encode(kvs[0], "none", key="c0")))
    with TieredStore(2 * size, tmp_path, size, policy="lru", bandwidths=[1e10, 1e9]) as store:
        for i, kv in enumerate(kvs[:3]):
            store.put(f"c{i}", kv)
        assert store.where("c0") == ("ssd", "none")  # oldest demoted
        got = store.get("c0")  # a hit promotes it, demoting the least recent (c1)
        assert got.tier == "ssd" and store.where("c0") == ("dram", "none")
        assert store.where("c1") == ("ssd", "none")
        assert_same(got.kv, kvs[0])
        store.put("c3", kvs[3])  # c1 leaves the last tier: counted
        assert "c1" not in store and store.stats()["evictions"] == 1


def test_lru_hit_too_large_for_dram_stays_on_ssd(rng, tmp_path):
    kv = context(rng)
    size = stored(len(encode(kv, "none", key="c0")))
    with TieredStore(size // 2, tmp_path, 2 * size, policy="lru", bandwidths=[1e10, 1e9]) as store:
        store.put("c0", kv)
        (path,) = tmp_path.glob("*.kvb")
        inode = path.stat().st_ino
        for _ in range(2):
            got = store.get("c0")
            assert got.tier == "ssd" and store.where("c0") == ("ssd", "none")
            assert_same(got.kv, kv)
        assert path.stat().st_ino == inode  # read in place, never written again
        assert store.stats()["moves"] == 0


@pytest.mark.parametrize(
    "policy,codec", [("kivi2-lru", "kivi-2"), ("streaming-lru", "streaming_llm-0.5")]
)
def test_baseline_codecs(rng, policy, codec):
    kv = context(rng)
    with TieredStore(8 * MB, policy=policy, bandwidths=[1e10]) as store:
        assert store.codecs == [codec]
        store.put("k", kv)
        assert store.get("k").codec == codec


def test_nothing_fits_is_counted(rng):
    with TieredStore(4096, bandwidths=[1e10]) as store:
        store.put("big", context(rng))
        assert "big" not in store
        assert store.stats()["evictions"] == 1


def test_zipf_trace_follows_its_popularity():
    requests, arrivals = zipf_trace(8, 200_000, exponent=1.0, rate=20.0, seed=3)
    counts = np.sort(np.bincount(requests, minlength=8))[::-1] / requests.size
    expected = 1.0 / np.arange(1, 9)
    np.testing.assert_allclose(counts, expected / expected.sum(), atol=0.005)
    gaps = np.diff(arrivals, prepend=0.0)
    assert np.all(gaps > 0) and abs(gaps.mean() - 1 / 20.0) < 0.001
    with pytest.raises(ValueError, match="contexts and requests must be positive"):
        zipf_trace(0, 10)


def test_replay_counts_hits_misses_and_repeat_requests(rng):
    kvs = [context(rng) for _ in range(3)]
    contexts = [(kv, probes(rng, kv), 10.0 * (i + 1)) for i, kv in enumerate(kvs)]
    size = stored(len(encode(kvs[0], "none", key="c0")))
    with TieredStore(2 * size, policy="lru", bandwidths=[1e10]) as store:
        # 0, 1 miss; 0 hits; 2 misses and evicts 1 (least recent); 0 hits; 1 misses.
        run = replay(store, contexts, [0, 1, 0, 2, 0, 1])
    assert run["served"] == {"dram": 2, "ssd": 0, "redis": 0, "miss": 4}
    assert run["evictions"] == 2  # 1 by the put of 2, then 0 or 2 by the put of 1
    # Hits cost microseconds, misses their recomputation (10, 20, 30 s).
    assert run["mean_delay"] == pytest.approx((10 + 20 + 30 + 20) / 6, abs=0.01)
    assert run["repeat_delay"] == pytest.approx(20 / 3, abs=0.01)  # requests 3, 5, 6
    assert run["quality"] == run["repeat_quality"] == 1.0  # lossless
    assert run["p95_delay"] == pytest.approx(np.quantile([0, 0, 10, 20, 20, 30], 0.95), abs=0.01)


def test_replay_hands_the_store_given_qualities_and_shows_each_hit(rng):
    kvs = [context(rng) for _ in range(2)]
    scores = [{"none": 0.9, "kivi-2": 0.25}, {"none": 0.5, "kivi-2": 0.0}]
    contexts = [(kv, probes(rng, kv), 1.0, q) for kv, q in zip(kvs, scores)]
    hits = []
    with TieredStore(1 << 24, policy="kivi2-lru", bandwidths=[1e10]) as store:
        run = replay(store, contexts, [0, 1, 0, 0, 1], on_hit=lambda i, got: hits.append((i, got)))
    assert [(i, got.codec, got.quality) for i, got in hits] == [
        (0, "kivi-2", 0.25),
        (0, "kivi-2", 0.25),
        (1, "kivi-2", 0.0),
    ]
    # A recomputed context scores as the exact cache ("none"); a hit as its codec.
    assert run["quality"] == pytest.approx((0.9 + 0.5 + 0.25 + 0.25 + 0.0) / 5)
    assert run["repeat_quality"] == pytest.approx((0.25 + 0.25 + 0.0) / 3)
    with TieredStore(1 << 24, policy="adaptive", bandwidths=[1e10]) as store:
        with pytest.raises(ValueError, match=r"context 0's quality names no .*kivi-4"):
            replay(store, contexts, [0])


# ---- SSD tier ------------------------------------------------------------------


def test_ssd_reopen_serves_every_entry(rng, tmp_path):
    kvs = {f"k{i}": context(rng, dtype=np.float16) for i in range(5)}
    with TieredStore(0, tmp_path, 64 * MB, bandwidths=[1e10, 1e9]) as store:
        for key, kv in kvs.items():
            store.put(key, kv)
        used = store.stats()["tiers"]["ssd"]["bytes"]
        entry_bytes = used // len(kvs)
    (tmp_path / "00000000000000aa.kvb.99.0.tmp").write_bytes(b"partial")  # an interrupted write
    damaged = sorted(tmp_path.glob("*.kvb"))[0]
    damaged.write_bytes(damaged.read_bytes()[:5000])  # a blob of the store's, truncated
    foreign = {"notes.tmp": b"mine", "00000000000000ff.kvb": b"not a blob", "x.kvb": b"x"}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "00000000000000ee.kvb")  # opening a FIFO must not hang
    with TieredStore(0, tmp_path, 64 * MB, bandwidths=[1e10, 1e9], o_direct=True) as store:
        assert store.stats()["corrupt"] == 1  # the truncated blob, counted and removed
        assert store.stats()["tiers"]["ssd"]["bytes"] == used - entry_bytes
        served = 0
        for key, kv in kvs.items():
            if key in store:
                got = store.get(key)
                assert got.tier == "ssd"
                assert_same(got.kv, kv)
                served += 1
        assert served == len(kvs) - 1
    assert not (tmp_path / "00000000000000aa.kvb.99.0.tmp").exists() and not damaged.exists()
    for name, data in foreign.items():  # files the store did not write are left alone
        assert (tmp_path / name).read_bytes() == data


def test_ssd_reopen_keeps_entries_with_long_keys(rng, tmp_path):
    keys = ["k" * 5000, "long-" + "x" * 70000]  # headers with keys beyond 4 KiB
    kv = context(rng, tokens=16)
    with TieredStore(0, tmp_path, 64 * MB, policy="lru", bandwidths=[1e10, 1e9]) as store:
        for key in keys:
            store.put(key, kv)
    with TieredStore(0, tmp_path, 64 * MB, policy="lru", bandwidths=[1e10, 1e9]) as store:
        assert store.stats()["corrupt"] == 0
        for key in keys:
            assert_same(store.get(key).kv, kv)


def test_ssd_fifo_in_place_of_a_blob_is_a_miss_not_a_hang(rng, tmp_path):
    kv = context(rng, tokens=16)
    with TieredStore(0, tmp_path, 64 * MB, policy="lru", bandwidths=[1e10, 1e9]) as store:
        store.put("a", kv)
        (path,) = tmp_path.glob("*.kvb")
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(KeyError):
            store.get("a")


def test_ssd_flipped_byte_is_dropped_not_served(rng, tmp_path):
    kv = context(rng)
    with TieredStore(0, tmp_path, 64 * MB, bandwidths=[1e10, 1e9]) as store:
        store.put("a", kv)
        store.put("b", kv)
        (path,) = [p for p in tmp_path.glob("*.kvb") if b"a" in p.read_bytes()[64:65]]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(KeyError):
            store.get("a")
        assert "a" not in store and store.stats()["corrupt"] == 1
        assert_same(store.get("b").kv, kv)


def test_ssd_prefetch(rng, tmp_path):
    kv = context(rng)
    with TieredStore(0, tmp_path, 64 * MB, bandwidths=[1e10, 1e9]) as store:
        store.put("a", kv)
        store.put("b", kv)
        store.prefetch("a")
        deadline = time.monotonic() + 120  # a guard against a hang, not a timing
        while store.stats()["tiers"]["ssd"]["prefetched"] == 0:
            assert time.monotonic() < deadline, "prefetch never finished"
            time.sleep(0.01)
        for path in tmp_path.glob("*.kvb"):  # the file goes: only the prefetched copy is left
            if path.read_bytes()[64:65] == b"a":
                path.unlink()
        assert_same(store.get("a").kv, kv)
        assert_same(store.get("b").kv, kv)
        for path in tmp_path.glob("*.kvb"):
            path.unlink()
        with pytest.raises(KeyError):  # a file removed behind the store's back is a miss
            store.get("b")
        assert "b" not in store and store.stats()["errors"] == 1


@pytest.mark.parametrize("policy", ["lru", "adaptive"])
def test_put_a_disk_cannot_write_raises_and_keeps_the_old_version(rng, tmp_path, policy):
    # Files limited to 4 KiB: the next blob's write fails (EFBIG) as on a full disk. The
    # store removed the old file first and returned normally, storing nothing.
    old, new = context(rng, tokens=64), context(rng, tokens=64)
    with TieredStore(0, tmp_path, 64 * MB, policy=policy, bandwidths=[1e10, 1e9]) as store:
        store.put("k", old)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
        try:
            with pytest.raises(OSError, match="'k' not stored") as replacing:
                store.put("k", new)
            with pytest.raises(OSError, match="'fresh' not stored") as adding:
                store.put("fresh", new)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, handler)
        assert replacing.value.errno == adding.value.errno == errno.EFBIG
        assert_same(store.get("k").kv, old)
        assert "fresh" not in store and store.stats()["errors"] == 2
        assert not list(tmp_path.glob("*.tmp"))
    with TieredStore(0, tmp_path, 64 * MB, policy=policy, bandwidths=[1e10, 1e9]) as store:
        assert_same(store.get("k").kv, old)


def test_overwrites_never_hide_an_entry_nor_serve_an_older_version(tmp_path):
    # One thread overwrites a key with ever newer versions while others prefetch and get
    # it: every get finds it (a read racing a rename was a miss) and never returns a
    # version older than the newest acknowledged when the get began.
    def version(v):
        a = np.full((2, 64, 16), float(v), np.float32)
        return [(a, a)]

    store = TieredStore(0, tmp_path, 64 * MB, policy="lru", bandwidths=[1e10, 1e9])
    store.put("k", version(0))
    acknowledged, failures, stop = [0], [], threading.Event()

    def writer():
        for v in itertools.count(1):
            if stop.is_set():
                return
            store.put("k", version(v))
            acknowledged[0] = v

    def reader():
        try:
            while not stop.is_set():
                newest = acknowledged[0]
                store.prefetch("k")
                got = store.get("k").kv[0][0][0, 0, 0]
                if got < newest:
                    failures.append(f"version {got} served after {newest} was acknowledged")
        except Exception as error:
            failures.append(repr(error))

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(4.0)  # how long the race runs, not a timing asserted
    stop.set()
    for t in threads:
        t.join()
    store.close()
    assert failures == [] and acknowledged[0] > 10


def test_lru_promotion_never_brings_back_a_replaced_version(tmp_path):
    # DRAM holds 4 of 16 entries, so gets promote from SSD while puts demote: a get that
    # read version v from SSD while a put replaced it (and the new version was demoted back
    # to SSD) promoted v over it, and v was served from then on.
    def version(key, v):
        block = np.full((2, 64, 64), float(v), np.float32)
        return [(block, block + int(key[1:]))]

    store = TieredStore(4 * 65536, tmp_path, 64 * MB, policy="lru", bandwidths=[1e10, 1e9])
    keys = [f"k{i}" for i in range(16)]
    acknowledged = dict.fromkeys(keys, 0)
    for key in keys:
        store.put(key, version(key, 0))
    failures, stop = [], threading.Event()

    def worker(index):
        r = np.random.default_rng(index)
        own, v = keys[2 * index : 2 * index + 2], 0
        try:
            while not stop.is_set():
                if r.random() < 0.35:
                    key = own[int(r.integers(2))]
                    v += 1
                    store.put(key, version(key, v))
                    acknowledged[key] = v
                else:
                    key = keys[int(r.integers(16))]
                    newest = acknowledged[key]
                    store.prefetch(key)
                    block, values = store.get(key).kv[0]
                    if block[0, 0, 0] < newest or np.any(values != block + int(key[1:])):
                        failures.append(f"{key}: {block[0, 0, 0]} served after {newest}")
        except Exception as error:
            failures.append(repr(error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(8.0)  # how long the race runs, not a timing asserted
    stop.set()
    for t in threads:
        t.join()
    store.close()
    assert failures == []


def test_concurrent_put_get_delete(tmp_path):
    def kv_of(key):  # content derived from the key: any corruption or mix-up shows
        seed = int(key[1:])
        r = np.random.default_rng(seed)
        return [(r.standard_normal((2, 64 + seed, 16)).astype(np.float32),) * 2]

    size = stored(len(encode(kv_of("k0"), "none", key="k0")))
    store = TieredStore(6 * size, tmp_path, 12 * size, policy="lru", bandwidths=[1e10, 1e9])
    failures = []

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            for _ in range(60):
                key = f"k{int(r.integers(0, 16))}"
                op = r.random()
                if op < 0.4:
                    store.put(key, kv_of(key))
                elif op < 0.85:
                    try:
                        got = store.get(key)
                    except KeyError:
                        continue
                    expected = kv_of(key)
                    if not np.array_equal(got.kv[0][0], expected[0][0]):
                        failures.append(key)
                else:
                    store.delete(key)
                stats = store.stats()
                for tier in stats["tiers"].values():
                    if tier["bytes"] > tier["capacity"]:
                        failures.append("capacity")
        except Exception as error:
            failures.append(repr(error))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert store.stats()["corrupt"] == 0
    store.close()


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, kvpack
    store = kvpack.TieredStore(0, sys.argv[1], 1 << 34, policy="lru", bandwidths=[1e10, 1e9])
    for i in range(1000):
        r = np.random.default_rng(i)
        kv = [(r.standard_normal((4, 2048, 64)).astype(np.float32),) * 2]
        store.put(f"k{i}", kv)
        print(i, flush=True)
    """
)


def test_killed_writer_leaves_no_corrupt_entry(tmp_path):
    store_dir = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store_dir)], stdout=subprocess.PIPE, text=True
    )
    acknowledged = []
    for line in proc.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) == 3:
            time.sleep(0.013)  # somewhere inside the next write
            break
    assert proc.poll() is None  # still writing when it is killed
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with TieredStore(0, store_dir, 1 << 34, bandwidths=[1e10, 1e9]) as store:
        for i in acknowledged:
            r = np.random.default_rng(i)
            got = store.get(f"k{i}")
            np.testing.assert_array_equal(
                got.kv[0][0], r.standard_normal((4, 2048, 64)).astype(np.float32)
            )
        for i in range(max(acknowledged) + 1, max(acknowledged) + 3):
            if f"k{i}" in store:  # written before the kill: whole, never torn
                r = np.random.default_rng(i)
                np.testing.assert_array_equal(
                    store.get(f"k{i}").kv[0][0], r.standard_normal((4, 2048, 64)).astype(np.float32)
                )
        assert store.stats()["corrupt"] == 0
    assert not list(store_dir.glob("*.tmp"))
