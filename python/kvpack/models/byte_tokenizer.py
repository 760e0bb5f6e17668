"""The tiny LM's tokenizer: one token per UTF-8 byte, and three special ids.

Ids 0-255 are bytes; ``BOS`` starts every sequence, ``EOS`` and ``PAD`` end and pad
batched ones. The model's vocabulary (:data:`VOCAB_SIZE`) leaves one id spare.
"""

from __future__ import annotations

__all__ = ["BOS", "EOS", "PAD", "VOCAB_SIZE", "decode", "encode"]

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 260


def encode(text: str | bytes, bos: bool = True) -> list[int]:
    """Byte-level token ids of ``text`` (UTF-8), with the begin-of-sequence id first."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    return ([BOS] if bos else []) + list(data)


def decode(ids) -> str:
    """Text of byte-level token ids; special ids are dropped, bad UTF-8 replaced."""
    return bytes(int(i) for i in ids if int(i) < 256).decode(errors="replace")
