from typing import Any, overload

import numpy as np

__version__: str

def cuda_compiled() -> bool: ...
def cuda_available() -> bool: ...
def cpu_target() -> str: ...
def cpu_targets() -> list[str]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def _data_pointer(array: np.ndarray) -> int: ...
def attention(
    q: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]: ...
def accumulated_attention(
    queries: np.ndarray,
    keys: np.ndarray,
    causal: bool = True,
    reduction: str = "sum",
    per_query_head: bool = False,
    scale: float | None = None,
    device: str = "cpu",
) -> np.ndarray: ...
def kmeans(
    x: np.ndarray,
    n_clusters: int,
    iters: int = 20,
    seed: int = 0,
    spherical: bool = True,
    init: str = "kmeans++",
    init_centroids: np.ndarray | None = None,
    device: str = "cpu",
) -> dict: ...

class ClusterIndex:
    def __init__(
        self,
        keys: np.ndarray,
        n_clusters: int = 0,
        sink: int = 16,
        iters: int = 20,
        seed: int = 0,
        init: str = "kmeans++",
        append_interval: int = 320,
        append_clusters: int = 8,
        tokens_per_cluster: int = 80,
    ) -> None: ...
    def append(self, new_keys: np.ndarray) -> None: ...
    def select(
        self, q: np.ndarray, budget: int, window: int = 0, per_query_head: bool = False
    ) -> np.ndarray: ...
    heads: int
    head_dim: int
    tokens: int
    sink: int
    n_clusters: int
    clustered_until: int
    centroids: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    order: np.ndarray
    labels: np.ndarray

class QuestIndex:
    def __init__(self, keys: np.ndarray, page_size: int = 16) -> None: ...
    def append(self, new_keys: np.ndarray) -> None: ...
    def select(self, q: np.ndarray, budget: int, per_query_head: bool = False) -> np.ndarray: ...
    heads: int
    head_dim: int
    tokens: int
    page_size: int
    pages: int
    page_bounds: tuple[np.ndarray, np.ndarray]

class ClusterKV:
    def __init__(
        self,
        budget: int = 1024,
        method: str = "clusterkv",
        n_clusters: int = 0,
        sink: int = 16,
        window: int = 0,
        recall_steps: int = 1,
        per_query_head: bool = False,
        page_size: int = 16,
        iters: int = 20,
        seed: int = 0,
        init: str = "kmeans++",
        append_interval: int = 320,
        append_clusters: int = 8,
    ) -> None: ...
    def prefill(self, keys: np.ndarray, values: np.ndarray) -> None: ...
    def step(self, q: np.ndarray, new_key: np.ndarray, new_value: np.ndarray) -> np.ndarray: ...
    tokens: int
    n_clusters: int
    last_step: dict
    total: dict
    last_selection: np.ndarray

def compress(
    keys: np.ndarray,
    values: np.ndarray,
    method: str,
    budget: float | int,
    queries: np.ndarray | None = None,
    attention: np.ndarray | None = None,
    scale: float | None = None,
    sinks: int = 4,
    recent_ratio: float = 0.5,
    window: int = 32,
    kernel: int = 5,
    merge_window: int = 32,
    protect_recent: float | None = None,
    protect_heavy: float | None = None,
    sigma: float | str = 5.0,
) -> dict[str, np.ndarray | None]: ...
def adjacent_similarity(keys: np.ndarray) -> np.ndarray: ...

class EvictionCache:
    def __init__(
        self,
        method: str,
        budget: int,
        sinks: int = 4,
        recent_ratio: float = 0.5,
        scale: float | None = None,
    ) -> None: ...
    def prefill(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        queries: np.ndarray | None = None,
        attention: np.ndarray | None = None,
    ) -> None: ...
    def step(self, q: np.ndarray, new_key: np.ndarray, new_value: np.ndarray) -> np.ndarray: ...
    @property
    def size(self) -> int: ...
    @property
    def seen(self) -> int: ...
    @property
    def budget(self) -> int: ...
    @property
    def keys(self) -> np.ndarray: ...
    @property
    def values(self) -> np.ndarray: ...
    @property
    def positions(self) -> np.ndarray: ...
    @property
    def scores(self) -> np.ndarray: ...

class QuantizedKV:
    def __init__(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        bits: int = 2,
        group: int = 32,
        residual: int = 128,
    ) -> None: ...
    @overload
    def dequantize(self) -> tuple[np.ndarray, np.ndarray]: ...
    @overload
    def dequantize(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def attend(
        self,
        q: np.ndarray,
        scale: float | None = None,
        return_lse: bool = False,
        return_weights: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]: ...
    nbytes: int
    bits: int
    group: int
    residual: int
    quantized: int
    heads: int
    tokens: int
    head_dim: int
    dtype: np.dtype

# Tiered store (AdaptCache): blobs, placement, tiers.
KV = list[tuple[np.ndarray, np.ndarray]]

def xxh64(data: bytes, seed: int = 0) -> int: ...
def xxh3(data: bytes, seed: int = 0) -> int: ...
def place(
    options: list[list[tuple[int, int, float]]],
    priorities: list[float],
    capacities: list[int],
) -> list[tuple[int, int] | None]: ...
def parse_codec(name: str) -> str: ...
def encode_blob(
    key: str, kv: KV, codec: str, probe_queries: list[np.ndarray] | None = None
) -> bytes: ...
def decode_blob(blob: bytes) -> dict[str, Any]: ...

class TieredStore:
    def __init__(
        self,
        dram_bytes: int,
        ssd_dir: str | None = None,
        ssd_bytes: int = 0,
        redis_host: str | None = None,
        redis_port: int = 6379,
        redis_db: int = 0,
        redis_prefix: str = "kvpack:",
        redis_bytes: int = 0,
        policy: str = "adaptive",
        alpha: float = 0.1,
        codecs: list[str] | None = None,
        o_direct: bool = False,
        io_threads: int = 2,
        streaming_rate: float = 0.5,
        bandwidths: list[float] | None = None,
        decode_bandwidths: list[float] | None = None,
        timeout_ms: int = 2000,
        secret: str | bytes = "",
    ) -> None: ...
    def put(
        self,
        key: str,
        kv: KV,
        probe_queries: list[np.ndarray] | None = None,
        quality: list[float] | None = None,
    ) -> None: ...
    def get(self, key: str) -> dict[str, Any] | None: ...
    def contains(self, key: str) -> bool: ...
    def remove(self, key: str) -> bool: ...
    def prefetch(self, key: str) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def where(self, key: str) -> tuple[str, str] | None: ...
    @property
    def codecs(self) -> list[str]: ...
    @property
    def bandwidths(self) -> list[float]: ...
