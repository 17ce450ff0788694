"""Tokenizer throughput: lmcore.Tokenizer vs tiktoken vs Hugging Face tokenizers, same vocabulary.

    .venv/bin/python bench/tokenizer.py [--mb 10] [--repeats 3] [--vocab ../shared/fixtures/gpt2.tiktoken]

Builds a ~10 MB corpus offline (the Python standard library's sources, plus seeded generated text
in a dozen scripts with emoji), checks that all three tokenizers agree on every document, then
times each mode over ``--repeats`` passes (implementations take turns on every document, or every
batch of 100, in random order; each unit counts its best time over the passes, so bursts of load
from other processes on a shared box wash out) and prints wall-clock MB/s and MB per CPU-second, each with the
ratio to tiktoken in the same mode. JSON goes to
``bench/results/tokenizer.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sysconfig
import tempfile
import time
from pathlib import Path

import tiktoken
import tokenizers
from vocab import bench_vocabulary  # bench/vocab.py (the script directory is on sys.path)

from lmcore import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def reference_encoding(ours: Tokenizer) -> tiktoken.Encoding:
    """tiktoken itself on the same ranks, pattern and special tokens: the reference row."""
    return tiktoken.Encoding("reference", pat_str=ours.pattern, special_tokens=dict(ours.special_tokens),
                             mergeable_ranks=ours.ranks)

WORDS = {
    "en": "the of and to in is that it was for on are with as his they be at one have this from".split(),
    "fr": "le la les des est une pour avec été très français déjà où naïve garçon élève".split(),
    "de": "der die das und ist nicht mit über für Straße größer schön Mädchen heißt".split(),
    "ru": "и в не на я что тот быть с весь это как она по но они к у ты из мы за".split(),
    "el": "και το να είναι η της με που για στο από τα στην οι ένα δεν θα".split(),
    "ar": "في من على إلى أن هذا التي عن مع هذه كان لا ما هو كل بين".split(),
    "he": "של את על זה לא עם הוא גם כל אני היא או מה אם".split(),
    "hi": "के है में की और को से का एक यह भी पर हैं नहीं".split(),
    "zh": "的 一 是 在 不 了 有 和 人 这 中 大 为 上 个 国 我 以 要 他".split(),
    "ja": "これ は 日本語 の テキスト です 東京 ひらがな カタカナ 漢字 を に が".split(),
    "ko": "이 그 저 것 수 있다 하다 되다 한국어 텍스트 입니다 에서".split(),
    "emoji": "🤗 🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 🏳️‍🌈 😀 🎉 ❤️ 1️⃣".split(),
}


def build_corpus(target_mb: float, seed: int = 0) -> list[str]:
    """~70% Python source (stdlib files, one document each), ~30% generated multilingual paragraphs."""
    target = int(target_mb * 1_000_000)
    docs: list[str] = []
    size = 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if size >= 0.7 * target:
            break
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text.encode())
    rng = random.Random(seed)
    langs = list(WORDS)
    while size < target:
        para = []
        for _ in range(rng.randint(5, 40)):
            lang = rng.choice(langs)
            sep = "" if lang in ("zh", "ja") else " "
            sentence = sep.join(rng.choice(WORDS[lang]) for _ in range(rng.randint(3, 15)))
            para.append(sentence + rng.choice([".", "!", "?", "。", "،", "…", ""]) + rng.choice([" ", "\n", "  ", "\n\n", "\t"]))
            if rng.random() < 0.1:
                para.append(f" {rng.randint(0, 10**rng.randint(1, 9))} ")
        text = "".join(para)
        docs.append(text)
        size += len(text.encode())
    return docs


def time_call(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=10.0, help="corpus size in MB (default 10)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=Path, default=None,
                    help="GPT-2 tiktoken rank file (default: found beside the clone, else a trained one; bench/vocab.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer.json")
    args = ap.parse_args()

    docs = build_corpus(args.mb)
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"corpus: {len(docs)} documents, {n_bytes / 1e6:.2f} MB; cpus={os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.2f}")

    vocab_path, vocab_name = bench_vocabulary(args.vocab)
    ours = Tokenizer.from_file(vocab_path)
    print(f"vocabulary: {vocab_name} ({ours.vocab_size:,} tokens)")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the rank file itself
    ref = reference_encoding(ours)
    with tempfile.TemporaryDirectory() as d:
        ours.save(d)  # the same vocabulary in Hugging Face's layout
        hf = tokenizers.Tokenizer.from_file(str(Path(d) / "tokenizer.json"))

    # Correctness first: all three agree on every document (special-token text allowed for HF's sake).
    ids = ours.encode_batch(docs)
    total_tokens = sum(map(len, ids))
    mismatch_tt = sum(a != b for a, b in zip(ids, ref.encode_ordinary_batch(docs)))
    mismatch_hf = sum(ours.encode(t, allowed_special="all") != e.ids
                      for t, e in zip(docs, hf.encode_batch(docs, add_special_tokens=False)))
    roundtrip = sum(ours.decode(i) != t for i, t in zip(ids, docs))
    print(f"tokens: {total_tokens:,}; documents differing from tiktoken: {mismatch_tt}, from HF tokenizers: "
          f"{mismatch_hf}; decode round-trip failures: {roundtrip}")

    threads = min(8, os.cpu_count() or 1)

    def stream(seq):
        dec = ours2.stream_decoder()
        push = dec.push
        for i in seq:
            push(i)
        dec.flush()

    hf_fast = getattr(hf, "encode_batch_fast", None)
    tt_batch = "tiktoken encode_ordinary_batch (8 threads)"
    # (mode, implementation, fn, baseline). "loop" modes call fn(text, ids) once per document;
    # "batch" mode calls fn(texts) once per slice of the corpus.
    # Every row gets its own core (its own Tokenizer / Encoding instance): rows sharing one core
    # keep its tables hot in cache for each other, which skewed an earlier version by ~10%.
    ours2 = Tokenizer.from_file(vocab_path)
    ref2 = reference_encoding(ours)
    tt_loop, tt_dec = "tiktoken encode_ordinary", "tiktoken decode"
    rows = [
        ("encode loop", "lmcore encode", lambda t, i: ours.encode(t), tt_loop),
        ("encode loop", tt_loop, lambda t, i: ref.encode_ordinary(t), None),
        ("encode loop", "tiktoken encode (special check)", lambda t, i: ref2.encode(t), tt_loop),
        ("encode loop", "HF tokenizers encode", lambda t, i: hf.encode(t, add_special_tokens=False), tt_loop),
        ("encode batch", f"lmcore encode_batch ({threads} threads)", lambda ts: ours.encode_batch(ts), tt_batch),
        ("encode batch", "lmcore encode_batch (8 threads)", lambda ts: ours2.encode_batch(ts, num_threads=8),
         tt_batch),
        ("encode batch", tt_batch, lambda ts: ref.encode_ordinary_batch(ts), None),
        ("encode batch", "HF tokenizers encode_batch", lambda ts: hf.encode_batch(ts, add_special_tokens=False),
         tt_batch),
        *([("encode batch", "HF tokenizers encode_batch_fast",
            lambda ts: hf_fast(ts, add_special_tokens=False), tt_batch)] if hf_fast else []),
        ("decode loop", "lmcore decode", lambda t, i: ours.decode(i), tt_dec),
        ("decode loop", tt_dec, lambda t, i: ref.decode(i), None),
        ("decode loop", "HF tokenizers decode", lambda t, i: hf.decode(i, skip_special_tokens=False), tt_dec),
        ("decode loop", "lmcore stream_decoder (push per token)", lambda t, i: stream(i), tt_dec),
    ]
    # Implementations of one mode take turns on every document (loop modes) or on every slice of
    # 100 documents (batch mode), in a fresh random order each time: a burst of load from the other
    # processes on this shared box, or the after-effects of the previous call (a heavy call leaves
    # caches cold, HF's rayon threads spin on), land on all alike. (A fixed rotation did not: the
    # row after HF's in the cycle was measured ~15% slow.)
    # Each unit keeps its best time over the repeats (a unit hit by another process's burst in one
    # repeat is clean in another); a row's time is the sum over units of those bests.
    cuts = list(range(0, len(docs), 100)) + [len(docs)]
    units = {"loop": list(zip(docs, ids)), "batch": [(docs[lo:hi],) for lo, hi in zip(cuts, cuts[1:])]}
    modes = list(dict.fromkeys(mode for mode, *_ in rows))
    for _, _, fn, _ in rows:  # warm up: thread pools, caches
        fn(*units["batch" if fn.__code__.co_argcount == 1 else "loop"][0])
    best_wall = {name: [math.inf] * len(units[mode.split()[-1]]) for mode, name, _, _ in rows}
    best_cpu = {name: [math.inf] * len(units[mode.split()[-1]]) for mode, name, _, _ in rows}
    passes: dict[str, list[float]] = {name: [] for _, name, _, _ in rows}  # whole-pass wall times
    rng = random.Random(0)
    for _ in range(args.repeats):
        for mode in modes:
            group = [(name, fn) for m, name, fn, _ in rows if m == mode]
            total = dict.fromkeys((n for n, _ in group), 0.0)
            for k, unit in enumerate(units[mode.split()[-1]]):
                rng.shuffle(group)
                for name, fn in group:
                    w, c = time_call(fn, *unit)
                    best_wall[name][k] = min(best_wall[name][k], w)
                    best_cpu[name][k] = min(best_cpu[name][k], c)
                    total[name] += w
            for name, t in total.items():
                passes[name].append(t)
    wall = {name: sum(v) for name, v in best_wall.items()}
    cpu = {name: sum(v) for name, v in best_cpu.items()}

    # Wall-clock MB/s is what a caller sees; MB per CPU-second (all threads) is the work done, and
    # stays meaningful when other processes share the cores (this box: 2 cores, several users).
    results = []
    speed = {name: n_bytes / 1e6 / t for name, t in wall.items()}
    per_cpu = {name: n_bytes / 1e6 / t for name, t in cpu.items()}
    header = (f"{'mode':<14} {'implementation':<44} {'MB/s':>7} {'Mtok/s':>7} {'vs tiktoken':>11} "
              f"{'MB/CPU-s':>9} {'vs tiktoken':>11}")
    print("\n" + header + "\n" + "-" * len(header))
    for mode, name, _, base in rows:
        base = base or name
        ratio, cpu_ratio = speed[name] / speed[base], per_cpu[name] / per_cpu[base]
        mtok = total_tokens / 1e6 / wall[name]
        print(f"{mode:<14} {name:<44} {speed[name]:>7.2f} {mtok:>7.2f} {ratio:>10.2f}x "
              f"{per_cpu[name]:>9.2f} {cpu_ratio:>10.2f}x")
        results.append({"mode": mode, "implementation": name, "baseline": base,
                        "mb_per_s": round(speed[name], 3), "mtokens_per_s": round(mtok, 3),
                        "ratio_vs_baseline": round(ratio, 3), "mb_per_cpu_s": round(per_cpu[name], 3),
                        "cpu_ratio_vs_baseline": round(cpu_ratio, 3),
                        "wall_seconds_best": round(wall[name], 4), "cpu_seconds_best": round(cpu[name], 4),
                        "wall_seconds_per_pass": [round(t, 4) for t in passes[name]]})

    # Head to head, nothing else in between: lmcore against tiktoken, per document, random order.
    paired = {}
    for what, a, b, arg in [("encode", ours.encode, ref.encode_ordinary, 0), ("decode", ours.decode, ref.decode, 1)]:
        best = {"lmcore": [math.inf] * len(docs), "tiktoken": [math.inf] * len(docs)}
        pair = [("lmcore", a), ("tiktoken", b)]
        for _ in range(args.repeats):
            for k, unit in enumerate(units["loop"]):
                rng.shuffle(pair)
                for name, fn in pair:
                    best[name][k] = min(best[name][k], time_call(fn, unit[arg])[1])
        paired[what] = sum(best["tiktoken"]) / sum(best["lmcore"])
    print("\nhead to head (CPU time, nothing else in between): lmcore/tiktoken speed = "
          + ", ".join(f"{w} {r:.3f}x" for w, r in paired.items()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "vocabulary": {"name": vocab_name, "size": ours.vocab_size, "path": str(vocab_path)},
        "corpus": {"documents": len(docs), "bytes": n_bytes, "tokens": total_tokens},
        "agreement": {"docs_differing_from_tiktoken": mismatch_tt, "docs_differing_from_hf": mismatch_hf,
                      "roundtrip_failures": roundtrip},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
                    "python": platform.python_version(), "tiktoken": tiktoken.__version__,
                    "tokenizers": tokenizers.__version__},
        "repeats": args.repeats,
        "results": results,
        "head_to_head_speed_ratio": {w: round(r, 4) for w, r in paired.items()},
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
