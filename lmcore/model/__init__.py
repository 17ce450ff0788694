"""The model layer: GPT-2's architecture, its config, the KV-cache types it reads, checkpoint I/O,
and looking inside it (``inspection``: next-token probabilities, attention weights, logit lens).

Imports nothing from the other layers but the tokenizer (a checkpoint directory carries one).
"""

from .checkpoint import read_checkpoint, write_checkpoint
from .config import PRESETS, GPTConfig
from .gpt import GPT, load_model, save_pretrained
from .inspection import Inspection, inspect_tokens

__all__ = ["GPT", "GPTConfig", "Inspection", "PRESETS", "inspect_tokens", "load_model", "read_checkpoint",
           "save_pretrained", "write_checkpoint"]
