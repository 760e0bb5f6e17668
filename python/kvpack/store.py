"""AdaptCache: a tiered DRAM / SSD / Redis store for whole contexts' KV caches.

Each entry is one context's cache, all layers: a list of ``(keys, values)`` pairs of
shape ``[heads_kv, tokens, head_dim]``. The store encodes it with a codec (see
:data:`CODECS`) into a versioned, checksummed blob and places it in a tier. The
``"adaptive"`` policy measures each codec's quality (attention-output fidelity on probe
queries) and decode time when the entry is put, and re-plans codec and tier of every
entry on each insertion to maximise ``frequency x (alpha x quality - delay)`` within the
tier capacities; ``"lru"``, ``"kivi2-lru"`` and ``"streaming-lru"`` are the baselines.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import operator
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from . import _core

__all__ = [
    "CODECS",
    "POLICIES",
    "StoredKV",
    "TieredStore",
    "context_key",
    "decode",
    "encode",
]

#: Codec names: ``none``, ``kivi-8|4|2`` and ``<method>-R`` for every compression method
#: of :mod:`kvpack.methods` (token dropping or merging) keeping a share R in (0, 1] of the
#: tokens. The adaptive policy's default candidates:
CODECS = (
    "none",
    "kivi-8",
    "kivi-4",
    "kivi-2",
    "streaming_llm-0.5",
    "snapkv-0.5",
    "h2o-0.5",
    "kvmerger-0.5",
    "snapkv-0.25",
    "h2o-0.25",
)
POLICIES = ("adaptive", "lru", "kivi2-lru", "streaming-lru")

KV = Sequence[tuple[np.ndarray, np.ndarray]]


@dataclass
class StoredKV:
    """A decoded entry and what loading it cost.

    ``kv`` holds ``(keys, values)`` per layer in the stored dtype; after token dropping or
    merging each layer has fewer tokens, with ``positions`` (the original position of
    each kept or pivot token) and ``counts`` (tokens each slot stands for) per layer.
    """

    kv: list[tuple[np.ndarray, np.ndarray]]
    codec: str
    tier: str
    bytes: int
    io_seconds: float
    decode_seconds: float
    quality: float
    positions: list[np.ndarray] | None = None
    counts: list[np.ndarray] | None = None

    @property
    def seconds(self) -> float:
        """Loading delay: reading plus decoding."""
        return self.io_seconds + self.decode_seconds


def context_key(tokens: Sequence[int] | np.ndarray) -> str:
    """The content key of a context: SHA-256 of its token ids (as int64)."""
    given = np.asarray(tokens)
    if given.dtype.kind not in "iu" and not (given.size == 0 and given.dtype.kind == "f"):
        # Floats would be truncated: [1.5, 2.5] must not key the entry of [1, 2].
        raise TypeError(f"tokens: expected integer token ids, got dtype {given.dtype}")
    ids = np.ascontiguousarray(given.astype(np.int64))
    return "tokens:" + hashlib.sha256(ids.tobytes()).hexdigest()


def _key(key: str | bytes | Sequence[int] | np.ndarray) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("latin-1")
    if isinstance(key, np.ndarray) or isinstance(key, Sequence):
        return context_key(key)
    raise TypeError(f"key: expected a str, bytes or token ids, got {type(key).__name__}")


def encode(kv: KV, codec: str = "none", *, key: str = "", probe_queries=None) -> bytes:
    """Encodes a context with ``codec`` into a blob (bytes); see :func:`decode`."""
    return _core.encode_blob(_key(key), kv, codec, probe_queries)


def decode(blob: bytes) -> StoredKV:
    """Decodes a blob from :func:`encode`; ValueError when it is corrupt."""
    out = _core.decode_blob(blob)
    return StoredKV(
        kv=out["kv"],
        codec=out["codec"],
        tier="",
        bytes=len(blob),
        io_seconds=0.0,
        decode_seconds=0.0,
        quality=math.nan,
        positions=out["positions"],
        counts=out["counts"],
    )


def _cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes of ``redis-cluster://host1:port1,host2:port2,...``."""
    nodes = []
    for address in url[len("redis-cluster://") :].rstrip("/").split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                "redis_url: expected 'redis-cluster://host1:port1,host2:port2,...' with ports "
                f"from 1 to 65535, got {url!r}"
            )
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def _redis_address(url: str) -> tuple[str, int, int]:
    parsed = urlparse(url)
    if parsed.scheme != "redis" or not parsed.hostname:
        raise ValueError(
            "redis_url: expected 'redis://host[:port][/db]' or "
            f"'redis-cluster://host1:port1,host2:port2,...', got {url!r}"
        )
    db = parsed.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"redis_url: expected a database number after '/', got {url!r}")
    try:
        port = parsed.port
    except ValueError:  # out of range
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"redis_url: expected a port from 1 to 65535, got {url!r}")
    return parsed.hostname, port or 6379, int(db or 0)


class TieredStore:
    """A tiered KV-cache store: DRAM, then an SSD directory, then a Redis server.

    Parameters
    ----------
    dram_bytes : int
        Capacity of the DRAM tier.
    ssd_dir, ssd_bytes : str, int
        Directory and capacity of the SSD tier (none without ``ssd_dir``). Entries found
        there when the store opens are served again.
    redis_url, redis_bytes : str, int
        ``redis://host:port/db`` of a shared remote tier, or
        ``redis-cluster://host1:port1,host2:port2,...`` (seed nodes of a Redis Cluster; any
        live one is enough), and the bytes this store may place there (default: unlimited).
        Entries another process put are found there.
    policy : str
        ``"adaptive"`` (default), ``"lru"``, ``"kivi2-lru"`` or ``"streaming-lru"``.
    alpha : float
        Seconds of loading delay one unit of quality is worth (adaptive).
    codecs : sequence of str
        The adaptive policy's candidates (default :data:`CODECS`; must include "none").
    o_direct : bool
        Read SSD files with O_DIRECT, bypassing the page cache.
    bandwidths : sequence of float
        Read bandwidth (bytes/s) per tier; profiled when the store opens if omitted.
    decode_bandwidths : float or sequence of float
        Stored bytes decoded per second, one per codec of :attr:`codecs` or one for all
        (``math.inf``: decoding is free); each candidate's decode is timed at ``put`` if
        omitted. With ``bandwidths`` too, the placement depends only on the entries, not on
        how busy the machine is.
    secret : str or bytes
        Signs every entry the store writes with HMAC-SHA256 under this secret and serves
        only entries signed with it: an entry someone without the secret wrote to the SSD
        directory or the Redis server is a miss (``stats()["unauthenticated"]``), never
        decoded. Stores sharing a tier share the secret. Without it entries are checksummed,
        which catches accidents, not forgeries. A blob the store cannot verify is someone
        else's: a counted miss, left where it is.

    Several processes may share the SSD directory and the Redis server: every put carries a
    version (a hybrid logical clock), the newest version found is served whoever wrote it,
    and a version older than one this store has written, served or deleted never is (a miss
    counted in ``stats()["stale"]``). ``put`` raises OSError when a tier cannot take the
    entry: a full disk, or a Redis server that refuses the connection or does not answer
    within ``timeout`` (one bound for all the put's calls to it); the version it would
    replace stays the entry.
    """

    def __init__(
        self,
        dram_bytes: int,
        ssd_dir: str | None = None,
        ssd_bytes: int = 0,
        redis_url: str | None = None,
        policy: str = "adaptive",
        *,
        redis_bytes: int | None = None,
        redis_prefix: str = "kvpack:",
        alpha: float = 0.1,
        codecs: Sequence[str] | None = None,
        o_direct: bool = False,
        io_threads: int = 2,
        streaming_rate: float = 0.5,
        bandwidths: Sequence[float] | None = None,
        decode_bandwidths: float | Sequence[float] | None = None,
        timeout: float = 2.0,
        secret: str | bytes | None = None,
    ) -> None:
        if secret is not None and not isinstance(secret, (str, bytes)):
            raise TypeError(f"secret: expected str or bytes, got {type(secret).__name__}")
        if secret is not None and len(secret) == 0:
            raise ValueError("secret: expected at least one byte, got an empty secret")
        cluster = None
        if isinstance(redis_url, str) and redis_url.startswith("redis-cluster://"):
            cluster, host, port, db = _cluster_nodes(redis_url), None, 6379, 0
        else:
            host, port, db = _redis_address(redis_url) if redis_url is not None else (None, 6379, 0)
        if ssd_dir is not None and (str(ssd_dir) == "" or "\0" in str(ssd_dir)):
            raise ValueError(f"ssd_dir: expected a directory path, got {str(ssd_dir)!r}")
        if ssd_dir is not None:
            _check_room(Path(ssd_dir), ssd_bytes)
        self._core = _core.TieredStore(
            dram_bytes,
            ssd_dir=None if ssd_dir is None else str(ssd_dir),
            ssd_bytes=ssd_bytes,
            redis_host=host,
            redis_port=port,
            redis_db=db,
            redis_prefix=redis_prefix,
            redis_bytes=(1 << 62) if redis_bytes is None else redis_bytes,
            policy=policy,
            alpha=alpha,
            codecs=_listed("codecs", codecs),
            o_direct=o_direct,
            io_threads=io_threads,
            streaming_rate=streaming_rate,
            bandwidths=_listed("bandwidths", bandwidths),
            decode_bandwidths=_per_codec(decode_bandwidths),
            timeout_ms=round(timeout * 1000),
            secret=secret.encode() if isinstance(secret, str) else (secret or b""),
            redis_cluster=cluster,
        )

    @property
    def _store(self) -> _core.TieredStore:
        if self._core is None:
            raise ValueError("store: it is closed")
        return self._core

    @property
    def codecs(self) -> list[str]:
        """The codecs the policy chooses among."""
        return self._store.codecs

    @property
    def bandwidths(self) -> list[float]:
        """Read bandwidth (bytes/s) per tier the policy assumes."""
        return self._store.bandwidths

    def put(
        self,
        key,
        kv: KV,
        probe_queries: Sequence[np.ndarray] | None = None,
        quality: Sequence[float] | Callable[[KV, StoredKV], float] | None = None,
    ) -> str:
        """Stores a context; returns its key.

        ``key`` is a string, or the context's token ids (keyed by :func:`context_key`).
        ``probe_queries`` (one float32 ``[heads_q, n, head_dim]`` per layer, e.g. the
        context's last queries) score each codec's quality and guide token dropping;
        without them each layer's last 32 keys stand in. ``quality`` replaces the
        measurement: one value per codec of :attr:`codecs`, or a function
        ``quality(kv, decoded)`` called for each codec.

        A version it replaces stays stored until the new one is in place. OSError when a
        tier cannot write the entry (a full or read-only disk): the previous version, if
        any, is then still the entry.
        """
        name = _key(key)
        if callable(quality):
            quality = [
                float(quality(kv, decode(encode(kv, codec, key=name, probe_queries=probe_queries))))
                for codec in self.codecs
            ]
        self._store.put(name, kv, probe_queries, None if quality is None else list(quality))
        return name

    def get(self, key) -> StoredKV:
        """The entry decoded, with its cost; KeyError when the store does not hold it."""
        out = self._store.get(_key(key))
        if out is None:
            raise KeyError(key)
        return StoredKV(
            kv=out["kv"],
            codec=out["codec"],
            tier=out["tier"],
            bytes=out["bytes"],
            io_seconds=out["io_seconds"],
            decode_seconds=out["decode_seconds"],
            quality=out["quality"],
            positions=out["positions"],
            counts=out["counts"],
        )

    def contains(self, key) -> bool:
        return self._store.contains(_key(key))

    __contains__ = contains

    def delete(self, key) -> bool:
        """Removes an entry; False when there was none."""
        return self._store.remove(_key(key))

    def prefetch(self, key) -> None:
        """Starts reading an SSD entry in the background for a later :meth:`get`."""
        self._store.prefetch(_key(key))

    def where(self, key) -> tuple[str, str] | None:
        """(tier, codec) of an entry this store placed, or None."""
        return self._store.where(_key(key))

    def stats(self) -> dict:
        """Hits, entries, bytes, capacity and prefetched blobs per tier; gets, misses,
        puts, evictions, moves, recompressions, corrupt entries dropped, entries refused as
        unauthenticated (see ``secret``) or as stale (older than a version seen), errors;
        mean and p95 loading delay (seconds) and mean quality over hits."""
        return self._store.stats()

    def close(self) -> None:
        """Stops the I/O threads; entries on SSD and Redis stay for the next store."""
        self._core = None

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _per_codec(decode_bandwidths) -> list[float] | None:
    """The decode cost model as the core takes it: one value per codec, or one for all."""
    if decode_bandwidths is None:
        return None
    if isinstance(decode_bandwidths, numbers.Real):
        return [float(decode_bandwidths)]
    return _listed("decode_bandwidths", decode_bandwidths)


def _listed(name: str, values) -> list | None:
    """A sequence argument as a list for the core, which names what its items should be; a
    string is not taken for a sequence of characters."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a list, got {type(values).__name__}")
    return list(values)


def _check_room(directory: Path, capacity: int) -> None:
    """Refuses an SSD capacity the directory's file system cannot hold (what the store
    already keeps there counts as room)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"ssd_dir: {str(directory)!r} is not a directory")
    kept = sum(p.stat().st_size for p in directory.glob("*.kvb")) if directory.is_dir() else 0
    free = shutil.disk_usage(existing).free + kept
    try:
        capacity = operator.index(capacity)  # Python and NumPy integers alike
    except TypeError:
        return  # not an integer: the core names the argument
    if capacity > free:
        raise ValueError(
            f"ssd_bytes: {capacity} bytes asked for, but {str(directory)!r} has "
            f"{free} bytes free (disk full or capacity too large)"
        )
