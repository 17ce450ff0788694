"""The vocabulary the benchmarks tokenize with: GPT-2's when it is here, else one lmstack trains.

GPT-2's rank file is not in the repository (a user's clone has no ``../shared/fixtures``). It is the
file ``tiktoken.get_encoding("gpt2")`` downloads and caches on a machine with internet access (it
lands in ``$TIKTOKEN_CACHE_DIR``): copy it to ``shared/fixtures/gpt2.tiktoken`` beside the clone,
set ``LMSTACK_GPT2_TIKTOKEN=/path/to/gpt2.tiktoken``, or pass ``--vocab``. Without it, the benchmarks
say so and train a byte-level BPE vocabulary on the Python standard library (as the shipped model's
was, ``docs/default-model.md``), cached under ``bench/results/``; figures are then for that
vocabulary, and the JSON says which one was used.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FALLBACK_VOCAB_SIZE = 8192
FALLBACK_DIR = ROOT / "bench" / "results" / f"stdlib-bpe-{FALLBACK_VOCAB_SIZE}"


def gpt2_rank_file(explicit: str | Path | None = None) -> Path | None:
    """GPT-2's rank file: ``explicit``, ``$LMSTACK_GPT2_TIKTOKEN``, or ``shared/fixtures`` beside the
    clone or any folder above it; None when none exists."""
    candidates = [explicit, os.environ.get("LMSTACK_GPT2_TIKTOKEN")]
    candidates += [d / "shared" / "fixtures" / "gpt2.tiktoken" for d in ROOT.parents]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def bench_vocabulary(explicit: str | Path | None = None) -> tuple[Path, str]:
    """``(path Tokenizer.from_file reads, name)``: GPT-2's, or the standard-library fallback."""
    found = gpt2_rank_file(explicit)
    if found is not None:
        return found, "gpt2"
    if explicit:
        raise SystemExit(f"--vocab {explicit}: no such file")
    print("GPT-2's vocabulary (gpt2.tiktoken) is not here; see bench/vocab.py for where to get it. Using a "
          f"{FALLBACK_VOCAB_SIZE}-token BPE vocabulary trained on the Python standard library instead.",
          file=sys.stderr)
    if not (FALLBACK_DIR / "tokenizer.json").is_file():
        from lmcore import Tokenizer

        stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        Tokenizer.train(stdlib, FALLBACK_VOCAB_SIZE, special_tokens=["<|endoftext|>"]).save(FALLBACK_DIR)
    return FALLBACK_DIR, f"stdlib-bpe-{FALLBACK_VOCAB_SIZE}"
