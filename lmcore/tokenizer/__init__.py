"""The tokenizer layer: byte-level BPE (``bpe``) and the file layouts it reads and writes (``files``)."""

from .bpe import Tokenizer

__all__ = ["Tokenizer"]
