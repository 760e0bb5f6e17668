import numpy as np

__version__: str

def cuda_compiled() -> bool: ...
def cuda_available() -> bool: ...
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
) -> dict: ...
