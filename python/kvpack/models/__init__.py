"""The models kvpack evaluates on.

``load_tiny_lm`` loads the small causal LM the project trains and ships: Llama
architecture, byte-level vocabulary (:mod:`kvpack.models.byte_tokenizer`), trained by
``python -m kvpack.eval.train_tiny_lm`` on the Python standard library's sources and
/usr/share/doc mixed with pass-key and key-value lookup tasks. Its weights (float16) and
the record of how they were trained lie in ``kvpack/models/tiny_lm``. Needs ``torch`` and
``transformers`` (``pip install kvpack[models]``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .._extras import require
from . import byte_tokenizer
from .byte_tokenizer import decode, encode
from .pretrained import PRETRAINED, load_pretrained

TINY_LM_DIR = Path(__file__).with_name("tiny_lm")

__all__ = [
    "PRETRAINED",
    "TINY_LM_DIR",
    "byte_tokenizer",
    "decode",
    "encode",
    "load_pretrained",
    "load_tiny_lm",
    "tiny_lm_config",
]


def tiny_lm_config(context: int = 2048):
    """The tiny LM's architecture: 4 Llama layers, hidden 256, 4 query heads and 2 KV
    heads of dimension 64 (grouped-query attention), byte vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=byte_tokenizer.VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=672,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=context,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=byte_tokenizer.BOS,
        eos_token_id=byte_tokenizer.EOS,
        pad_token_id=byte_tokenizer.PAD,
    )


def load_tiny_lm(path: str | Path | None = None, dtype=None, attn_implementation: str = "sdpa"):
    """Load the shipped tiny LM (offline).

    Parameters
    ----------
    path : str or Path, optional
        A directory written by the training script; default the shipped weights.
    dtype : torch.dtype, optional
        Default float32 (the weights are stored in float16).
    attn_implementation : str
        Transformers attention implementation.

    Returns
    -------
    transformers.LlamaForCausalLM
        In eval mode. ``model.config.max_position_embeddings`` is the trained context;
        tokens are bytes (:func:`encode`, :func:`decode`).
    """
    require("load_tiny_lm", "torch", "transformers", "safetensors")
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    directory = Path(path) if path is not None else TINY_LM_DIR
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"path: no tiny LM (config.json) in {directory}")
    # Loading 38 tensors takes milliseconds: no progress bar among a caller's output.
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model = LlamaForCausalLM.from_pretrained(
            directory, dtype=dtype or torch.float32, attn_implementation=attn_implementation
        )
    finally:
        if bar:
            logging.enable_progress_bar()
    return model.eval()


def training_record(path: str | Path | None = None) -> dict:
    """Settings, data, seed and measured results of the shipped weights' training run."""
    directory = Path(path) if path is not None else TINY_LM_DIR
    return json.loads((directory / "training.json").read_text())
