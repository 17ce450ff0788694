"""The shipped ``pycode`` model's held-out split, rebuilt exactly as ``lmstack train`` made it.

``models/pycode`` was trained on CPython's top-level standard-library modules (``<stdlib>/*.py``,
sorted) cut into 257-token windows, with a seeded 5% held out (``training.json`` records the
arguments; ``lmcore.training.pretrain`` does the cut). This module redoes that cut with the model's
own tokenizer, so the perplexity gate (``tests/lmcore/model/test_quantize.py``) and the benchmark's
code prompts (``bench/generate.py``) read text the model never trained on.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

from lmcore.training.data import TokenBlocks, encode_documents, read_text_files, train_eval_split

PYCODE_DIR = Path(__file__).resolve().parent.parent / "models" / "pycode"


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def heldout_windows(tokenizer, model_dir: Path = PYCODE_DIR) -> torch.Tensor:
    """``(n, block_size + 1)`` held-out token windows; ValueError if this Python's standard library
    is not the one the model was trained on (the token count differs from ``training.json``'s)."""
    record = json.loads((model_dir / "training.json").read_text())
    args, result = record["arguments"], record["result"]
    tokens = encode_documents(tokenizer, read_text_files(stdlib_files()))
    if len(tokens) != result["n_tokens"]:
        raise ValueError(f"this Python's standard library gives {len(tokens)} tokens, the model was trained on "
                         f"{result['n_tokens']} (CPython 3.11.7's): its held-out split cannot be rebuilt here")
    blocks = TokenBlocks(tokens, args["block_size"])
    _, heldout = train_eval_split(blocks, args["eval_fraction"], args["seed"])
    T = blocks.block_size
    return torch.stack([blocks.tokens[i * T:(i + 1) * T + 1] for i in heldout.indices])


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over every position of the windows."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(w[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1),
                                                 reduction="sum")
        total, count = total + float(loss), count + w[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
