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


def _split(tokenizer, model_dir: Path):
    """``(blocks, train, heldout)``: the model's corpus cut as ``lmstack train`` cut it."""
    record = json.loads((model_dir / "training.json").read_text())
    args, result = record["arguments"], record["result"]
    tokens = encode_documents(tokenizer, read_text_files(stdlib_files()))
    if len(tokens) != result["n_tokens"]:
        raise ValueError(f"this Python's standard library gives {len(tokens)} tokens, the model was trained on "
                         f"{result['n_tokens']} (CPython 3.11.7's): its held-out split cannot be rebuilt here")
    blocks = TokenBlocks(tokens, args["block_size"])
    train, heldout = train_eval_split(blocks, args["eval_fraction"], args["seed"])
    return blocks, train, heldout


def _windows(blocks: TokenBlocks, indices) -> torch.Tensor:
    T = blocks.block_size
    return torch.stack([blocks.tokens[i * T:(i + 1) * T + 1] for i in indices])


def heldout_windows(tokenizer, model_dir: Path = PYCODE_DIR) -> torch.Tensor:
    """``(n, block_size + 1)`` held-out token windows; ValueError if this Python's standard library
    is not the one the model was trained on (the token count differs from ``training.json``'s)."""
    blocks, _, heldout = _split(tokenizer, model_dir)
    return _windows(blocks, heldout.indices)


def training_windows(tokenizer, model_dir: Path = PYCODE_DIR) -> torch.Tensor:
    """``(n, block_size + 1)`` token windows of the model's training split (the rest of the corpus)."""
    blocks, train, _ = _split(tokenizer, model_dir)
    return _windows(blocks, train.indices)


def write_draft_corpus(out_dir: str | Path, prompt_len: int = 128, new_tokens: int = 128,
                       limit: int | None = None, per_file: int = 100) -> list[Path]:
    """The distillation corpus the shipped draft (``models/pycode-draft``) is trained on: every
    training-split window's first ``prompt_len`` tokens followed by ``pycode``'s own greedy
    continuation of ``new_tokens``, decoded to text, ``per_file`` samples per ``.txt`` file.

    A draft is worth what it agrees with its target *on the target's own output* (what it
    proposes against), so it learns from that output (sequence-level distillation, as in
    DistillSpec): trained on this instead of the raw corpus, the same 2-layer draft's greedy choice
    matched ``pycode``'s at 75% of positions instead of 64% (docs/generation.md). Held-out windows
    are never used, so the bench's held-out prompts stay unseen by the draft too."""
    from lmcore import Engine, SamplingParams, load_model

    model = load_model(PYCODE_DIR)
    tok = model.tokenizer
    windows = training_windows(tok)[:limit]
    engine = Engine(model, max_batch_size=32, max_waiting=len(windows), enable_prefix_cache=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [w[:prompt_len].tolist() for w in windows]
    ids = [engine.add_request(p, params) for p in prompts]
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    texts = [tok.decode(p + got[i]) for p, i in zip(prompts, ids)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for j in range(0, len(texts), per_file):
        files.append(out / f"distill_{j // per_file:03d}.txt")
        files[-1].write_text("\n\n".join(texts[j:j + per_file]))
    return files


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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write the shipped draft's distillation corpus (see write_draft_corpus)")
    parser.add_argument("out", help="directory for the .txt files")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    written = write_draft_corpus(a.out)
    print(f"wrote {len(written)} files to {a.out}")
