"""Files every layer writes: the one atomic-write helper and the names of the files in a model directory.

Why atomic: a model directory is read by other processes (an inference service refreshing its store,
a worker resuming a job) while it is written, and a process can be killed at any moment (the
fine-tuning workers are tested with ``kill -9``). Every file is therefore written to a temporary
name beside its destination, flushed to disk, and renamed over it: a reader sees the old file or the
new one, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A model directory in Hugging Face's GPT-2 layout (lmcore.model.checkpoint).
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
# The tokenizer's files beside the weights (lmcore.tokenizer.files); either of the first two suffices.
TOKENIZER_JSON_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER_JSON_FILE, VOCAB_FILE)
# A LoRA adapter directory (lmcore.lora.adapter), PEFT's names.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer lmcore can load."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def fsync_path(path: str | Path) -> None:
    """Flush a file (or every file of a directory) to disk."""
    path = Path(path)
    for f in (sorted(path.iterdir()) if path.is_dir() else [path]):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush what was written there
    (a file or a directory) and rename it over ``path``. On an error the temporary file is removed.

    For writers that want a file name (``safetensors.torch.save_file``, ``torch.save``)::

        with atomic_path(directory / SAFETENSORS_FILE) as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_file():
            tmp.unlink()


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
