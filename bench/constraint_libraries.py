"""Which library computes structured-output token masks: xgrammar, llguidance, outlines-core.

For each library and each vocabulary (the shipped ``pycode`` tokenizer, GPT-2's 50,257 tokens) it
measures, in one run on one thread:

* the one-time setup per tokenizer (the library's vocabulary object / tokenizer info);
* compile time of a small nested JSON schema, a regex and a choice list (a fresh cache each time);
* the per-step mask: fill a token bitmask for the matcher's state and advance by one token, along
  a valid JSON document (the per-token cost a decode step pays), and the cost of applying that
  mask to one ``(V,)`` logits row with torch.

Libraries that are not installed are skipped (``pip install xgrammar llguidance outlines-core``).
The chosen library (``lmcore.engine.constraints``) is a runtime dependency; the others are not.

    python bench/constraint_libraries.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcore import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = '{"name": "Ada", "age": 36, "tags": ["a", "c"], "address": {"city": "London"}}'
REGEX = r"[0-9]{3}-[0-9]{4} [A-Z][a-z]{2,8}"
CHOICES = ["positive", "negative", "neutral"]


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def vocab_of(tok: Tokenizer) -> list[bytes]:
    return [tok.token_bytes(i) for i in range(tok.vocab_size)]


def document_ids(tok: Tokenizer) -> list[int]:
    return tok.encode(DOCUMENT) + [tok.eos_id]


# --- one adapter per library: setup(tok) -> ctx; compile(ctx, kind, spec) -> grammar; steps -----------
def bench_xgrammar(tok: Tokenizer, vocab: list[bytes], ids: list[int]) -> dict:
    import xgrammar as xgr

    def setup():
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[tok.eos_id])
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    compiler = setup()
    compiles = {
        "json_schema": lambda: compiler.compile_json_schema(json.dumps(SCHEMA)),
        "regex": lambda: compiler.compile_regex(REGEX),
        "choice": lambda: compiler.compile_regex("|".join(f"({c})" for c in CHOICES)),
    }
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    bitmask = xgr.allocate_token_bitmask(1, len(vocab))

    def walk():
        m = xgr.GrammarMatcher(compiled)
        for t in ids:
            m.fill_next_token_bitmask(bitmask, 0)
            assert m.accept_token(t), t
        assert m.is_terminated()

    logits = torch.randn(1, len(vocab))
    return dict(setup=best_of(setup, 1), compiles=compiles, walk=walk,
                apply=lambda: xgr.apply_token_bitmask_inplace(logits, bitmask))


def bench_llguidance(tok: Tokenizer, vocab: list[bytes], ids: list[int]) -> dict:
    import llguidance
    import llguidance.numpy
    import llguidance.torch

    def setup():
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_LLTok(tok, vocab)))

    lltok = setup()

    def compile_(grammar):
        m = llguidance.LLMatcher(lltok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    compiles = {
        "json_schema": lambda: compile_(llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)),
        "regex": lambda: compile_(llguidance.LLMatcher.grammar_from_regex(REGEX)),
        "choice": lambda: compile_(llguidance.LLMatcher.grammar_from_regex("|".join(f"({c})" for c in CHOICES))),
    }
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)

    def walk():
        m = llguidance.LLMatcher(lltok, grammar)
        for t in ids:
            llguidance.torch.fill_next_token_bitmask(m, bitmask, 0)
            assert m.consume_token(t), (t, m.get_error())
        assert m.is_stopped() or m.is_accepting()

    logits = torch.randn(1, len(vocab))
    return dict(setup=best_of(setup, 1), compiles=compiles, walk=walk,
                apply=lambda: llguidance.torch.apply_token_bitmask_inplace(logits, bitmask))


class _LLTok:
    """llguidance's duck-typed tokenizer: raw token bytes, the eos id and an encoder."""

    def __init__(self, tok: Tokenizer, vocab: list[bytes]):
        self.tokens = vocab
        self.eos_token_id = tok.eos_id
        self.bos_token_id = None
        self._tok = tok

    def __call__(self, s):
        return self._tok.encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)


def bench_outlines(tok: Tokenizer, vocab: list[bytes], ids: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def setup():
        mapping: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if i != tok.eos_id:
                mapping.setdefault(b, []).append(i)
        return Vocabulary(tok.eos_id, mapping)

    voc = setup()
    compiles = {
        "json_schema": lambda: Index(build_regex_from_schema(json.dumps(SCHEMA)), voc),
        "regex": lambda: Index(REGEX, voc),
        "choice": lambda: Index("|".join(f"({c})" for c in CHOICES), voc),
    }
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), voc)
    words = (len(vocab) + 31) // 32
    bitmask = torch.zeros(1, words, dtype=torch.int32)

    def walk():
        g = Guide(index)
        for t in ids:
            g.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())
            if t != tok.eos_id:
                g.advance(t)
        assert g.is_finished()

    return dict(setup=best_of(setup, 1), compiles=compiles, walk=walk, apply=None)


LIBRARIES = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance, "outlines-core": bench_outlines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--gpt2", type=Path, default=Path(os.environ.get("LMSTACK_GPT2_TIKTOKEN",
                                                                     "/work/shared/fixtures/gpt2.tiktoken")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    tokenizers = {"pycode": Tokenizer.from_file(root / "models" / "pycode")}
    if args.gpt2.exists():
        tokenizers["gpt2"] = Tokenizer.gpt2(args.gpt2)
    else:
        print(f"{args.gpt2} not found: GPT-2 rows skipped (set LMSTACK_GPT2_TIKTOKEN)")
    rows = []
    for tname, tok in tokenizers.items():
        vocab, ids = vocab_of(tok), document_ids(tok)
        for lname, fn in LIBRARIES.items():
            try:
                r = fn(tok, vocab, ids)
            except ImportError as e:
                print(f"{lname}: not installed ({e}); skipped")
                continue
            row = dict(tokenizer=tname, library=lname, vocab=len(vocab), setup_ms=r["setup"] * 1e3)
            for kind, c in r["compiles"].items():
                row[f"compile_{kind}_ms"] = best_of(c) * 1e3
            row["mask_step_us"] = best_of(r["walk"], 5) / len(ids) * 1e6
            row["apply_us"] = best_of(r["apply"], 50) * 1e6 if r["apply"] else None
            rows.append(row)
    cols = ["tokenizer", "library", "vocab", "setup_ms", "compile_json_schema_ms", "compile_regex_ms",
            "compile_choice_ms", "mask_step_us", "apply_us"]
    print(" | ".join(f"{c:>14}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]:>14.2f}" if isinstance(row[c], float) else f"{str(row[c]):>14}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
