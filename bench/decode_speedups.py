"""Issue 15's rows for ``bench/generate.py``: int8 weights, speculative decoding, the prefix cache.

Every row runs in the same process as its reference (transformers fp32 for the GPT-2-small shape,
plain lmcore at the same precision for ``pycode``), and every time is taken on two clocks at once:
process CPU time (the README's clock, robust to other jobs on a shared machine) and wall time.

* GPT-2-small shape, random weights (speed only): transformers fp32; lmcore fp32, int8, fp32 +
  prompt lookup, int8 + prompt lookup; batch 1 and 8; the int8 logit error vs fp32 and how often
  greedy tokens differ from fp32's over the bench prompts.
* ``pycode`` (the shipped model) on 8 real code prompts from its held-out split: plain, prompt
  lookup, int8, int8 + prompt lookup and the draft model (``models/pycode-draft`` when present),
  batch 1 (the 8 requests one after another) and 8 (all at once), with acceptance rates and
  whether the tokens equal plain decoding's.

Each lmcore row builds its Engine once, outside the timed runs, and warms it with one run, as a
server does at start-up (the first steps at a new row count make oneDNN's kernels); the
transformers rows likewise time ``generate`` on a loaded model.
* the prefix cache: time to first token of a request sharing a 960-token prefix (5 new tokens),
  cold vs cached, on the GPT-2-small shape.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from lmcore import Engine, SamplingParams, load_model
from lmcore.model.config import GPTConfig
from lmcore.model.gpt import GPT

ROOT = Path(__file__).resolve().parent.parent


def clocks(fn, repeats: int) -> tuple[float, float, object]:
    """Best (cpu seconds, wall seconds) of ``repeats`` runs, and the last result."""
    best_cpu = best_wall = float("inf")
    out = None
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - c), min(best_wall, time.perf_counter() - w)
    return best_cpu, best_wall, out


def make_engine(model, prompts, params, draft=None, **kw) -> Engine:
    """An Engine sized for ``prompts`` and speculating as ``params`` do, as a server's engine set to
    that mode would be (its weight layouts fit the verify segments). Built once per row, outside
    the timed runs, and warmed by one run: a server builds its engine at start-up, and oneDNN
    makes its kernels for each new row count on first use."""
    longest = max(len(p) for p in prompts) + params.max_tokens
    e = Engine(model, max_batch_size=len(prompts), max_waiting=len(prompts), enable_prefix_cache=False,
               max_seq_len=min(longest, model.config.block_size), prefill_chunk_size=max(256, longest),
               draft_model=draft, speculation=params.speculation or "off", **kw)
    engine_generate(e, prompts, params)
    return e


def engine_generate(e: Engine, prompts, params, one_at_a_time: bool = False):
    """All prompts through the engine, batched (or one request after another); (token lists,
    the engine's stats counted over this run only)."""
    before = e.stats()
    got: dict[str, list[int]] = {}
    ids = []
    for group in ([[p] for p in prompts] if one_at_a_time else [prompts]):
        ids += [e.add_request(p, params) for p in group]
        while e.has_unfinished():
            for o in e.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
    after = e.stats()
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    return [got[i] for i in ids], delta


def hf_generate(hf, prompts, n):
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, eos_token_id=None, pad_token_id=0)


def _row(rows, system, batch, cpu, wall, tokens, ref=None, **extra):
    r = dict(system=system, batch=batch, tokens=tokens, cpu_s=cpu, wall_s=wall, tok_s_cpu=tokens / cpu,
             tok_s_wall=tokens / wall, **extra)
    if ref is not None:
        r["vs_cpu"], r["vs_wall"] = r["tok_s_cpu"] / ref["tok_s_cpu"], r["tok_s_wall"] / ref["tok_s_wall"]
    rows.append(r)
    vs = f"  {r['vs_cpu']:.2f}x cpu / {r['vs_wall']:.2f}x wall" if ref is not None else ""
    more = "".join(f"  {k}={v:.3f}" if isinstance(v, float) else f"  {k}={v}" for k, v in extra.items())
    print(f"  {system:<34} b{batch}: {r['tok_s_cpu']:8.1f} tok/s cpu {r['tok_s_wall']:8.1f} wall{vs}{more}", flush=True)
    return r


def gpt2_rows(n_new: int, repeats: int) -> dict:
    import transformers

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2")
    fp32 = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        fp32.save_pretrained(d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
        int8 = load_model(d, quantize="int8")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (32,), generator=g).tolist() for _ in range(8)]
    rows: list[dict] = []
    res: dict = dict(shape="gpt2", new_tokens=n_new, rows=rows)
    # The read ceiling: every fp32 weight read once (matrix-vector), and every int8 weight of the
    # quantized model (fbgemm at one row), on both clocks: the fastest batch-1 decode could reach.
    weights = list({id(p): p.detach() for p in fp32.parameters() if p.dim() == 2}.values())
    nbytes = sum(w.numel() * 4 for w in weights)
    vecs = {w.shape[1]: torch.ones(w.shape[1]) for w in weights}
    cpu, wall, _ = clocks(lambda: [torch.mv(w, vecs[w.shape[1]]) for w in weights], 5)
    res["fp32_read"] = dict(bytes=nbytes, gb_s_cpu=nbytes / cpu / 1e9, gb_s_wall=nbytes / wall / 1e9,
                            tok_s_cpu=1 / cpu, tok_s_wall=1 / wall)
    print(f"[gpt2 shape] fp32 weights {nbytes / 1e6:.0f} MB read at {res['fp32_read']['gb_s_cpu']:.1f} GB/s cpu clock, "
          f"{res['fp32_read']['gb_s_wall']:.1f} wall: ceiling {1 / cpu:.1f} / {1 / wall:.1f} tok/s", flush=True)
    with torch.inference_mode():
        x = torch.tensor(prompts)
        a, b = fp32(x), int8(x)
        err = (a - b).abs()
        res["int8_logit_error"] = dict(max=float(err.max()), mean=float(err.mean()), logit_std=float(a.std()),
                                       argmax_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    print(f"[gpt2 shape] int8 logit error vs fp32: {res['int8_logit_error']}", flush=True)
    greedy = dict(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    plain, spec = SamplingParams(**greedy, speculation="off"), SamplingParams(**greedy, speculation="prompt_lookup")
    for B in (1, 8):
        ps = prompts[:B]
        cpu, wall, _ = clocks(lambda ps=ps: hf_generate(hf, ps, n_new), repeats)
        ref = _row(rows, "transformers fp32", B, cpu, wall, B * n_new)
        outs = {}
        for name, model, params in (("lmcore fp32", fp32, plain), ("lmcore int8", int8, plain),
                                    ("lmcore fp32 + prompt lookup", fp32, spec),
                                    ("lmcore int8 + prompt lookup", int8, spec)):
            e = make_engine(model, ps, params)
            cpu, wall, (toks, stats) = clocks(lambda e=e, p=params, ps=ps: engine_generate(e, ps, p), repeats)
            outs[name] = toks
            extra = {}
            if params.speculation == "prompt_lookup":
                extra["acceptance"] = stats["spec_accepted_tokens"] / max(1, stats["spec_proposed_tokens"])
                base = outs[name.replace(" + prompt lookup", "")]
                extra["identical_to_plain"] = toks == base
            _row(rows, name, B, cpu, wall, B * n_new, ref, **extra)
        diverged = sum(len(a) - next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                       for a, b in zip(outs["lmcore fp32"], outs["lmcore int8"]))
        res[f"int8_greedy_diverged_tokens_b{B}"] = (diverged, B * n_new)
        print(f"  int8 vs fp32 greedy: {diverged}/{B * n_new} tokens after a first difference", flush=True)
    return res


def prefix_ttft(repeats: int) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    prefix = torch.randint(0, 50257, (960,), generator=torch.Generator().manual_seed(3)).tolist()
    first = SamplingParams(max_tokens=1, temperature=0.0)
    best = dict(cold_cpu=float("inf"), cold_wall=float("inf"), cached_cpu=float("inf"), cached_wall=float("inf"))
    for _ in range(repeats):
        e = Engine(model, max_batch_size=2, prefill_chunk_size=256)
        for kind, tail in (("cold", [1, 2, 3, 4, 5]), ("cached", [6, 7, 8, 9, 10])):
            c, w = time.process_time(), time.perf_counter()
            e.add_request(prefix + tail, first)
            while e.has_unfinished():
                e.step()
            best[f"{kind}_cpu"] = min(best[f"{kind}_cpu"], time.process_time() - c)
            best[f"{kind}_wall"] = min(best[f"{kind}_wall"], time.perf_counter() - w)
        computed = e.stats()["prompt_tokens_computed"]
    best.update(ratio_cpu=best["cold_cpu"] / best["cached_cpu"], ratio_wall=best["cold_wall"] / best["cached_wall"],
                prompt_tokens_computed=computed)
    print(f"[prefix cache] TTFT 960-token shared prefix + 5: cold {1e3 * best['cold_cpu']:.0f} ms cpu / "
          f"{1e3 * best['cold_wall']:.0f} ms wall, cached {1e3 * best['cached_cpu']:.0f} / {1e3 * best['cached_wall']:.0f} "
          f"ms: {best['ratio_cpu']:.1f}x cpu, {best['ratio_wall']:.1f}x wall (tokens computed {computed} = 965 + 5)",
          flush=True)
    return best


def pycode_rows(n_new: int, repeats: int, prompt_len: int = 128) -> dict:
    from bench.pycode_data import PYCODE_DIR, heldout_windows

    fp32 = load_model(PYCODE_DIR)
    int8 = load_model(PYCODE_DIR, quantize="int8")
    draft_dir = ROOT / "models" / "pycode-draft"
    draft = draft8 = None
    if (draft_dir / "config.json").is_file():
        draft, draft8 = load_model(draft_dir), load_model(draft_dir, quantize="int8")
    windows = heldout_windows(fp32.tokenizer)
    step = len(windows) // 8
    prompts = [windows[i * step, :prompt_len].tolist() for i in range(8)]  # 8 held-out code prompts
    rows: list[dict] = []
    res: dict = dict(shape="pycode", new_tokens=n_new, prompt_len=prompt_len, rows=rows)
    greedy = dict(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    for B in (1, 8):  # batch 1: the 8 prompts one request after another; batch 8: all at once
        ps = prompts
        outs = {}
        refs = {}
        systems = [("fp32", fp32, "off", None), ("fp32 + prompt lookup", fp32, "prompt_lookup", None),
                   ("int8", int8, "off", None), ("int8 + prompt lookup", int8, "prompt_lookup", None)]
        if draft is not None:  # the draft at the target's precision
            systems += [("fp32 + draft model", fp32, "draft", draft), ("int8 + draft model", int8, "draft", draft8)]
        for name, model, mode, d in systems:
            params = SamplingParams(**greedy, speculation=mode)
            e = make_engine(model, ps[:B], params, draft=d)
            cpu, wall, (toks, stats) = clocks(
                lambda e=e, p=params, ps=ps, one=B == 1: engine_generate(e, ps, p, one_at_a_time=one), repeats)
            outs[name] = toks
            precision = name.split()[0]
            extra = {}
            if mode != "off":
                extra["acceptance"] = stats["spec_accepted_tokens"] / max(1, stats["spec_proposed_tokens"])
                extra["tokens_per_verify"] = (stats["spec_accepted_tokens"] + stats["spec_decode_steps"]) / max(
                    1, stats["spec_decode_steps"])
                extra["identical_to_plain"] = toks == outs[precision]
            r = _row(rows, f"pycode {name}", B, cpu, wall, len(ps) * n_new, refs.get(precision), **extra)
            refs.setdefault(precision, r)
    return res


def run(n_new: int = 64, repeats: int = 2) -> dict:
    """Every row, with the machine's load average before and after (other jobs share the cores:
    they slow the wall clock most, and even the cpu clock through the shared memory bandwidth)."""
    import os

    torch.set_num_threads(1)
    t0, load_before = time.perf_counter(), os.getloadavg()
    print(f"[speedups] load average {load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f} at the start",
          flush=True)
    res = dict(prefix_cache=prefix_ttft(repeats), gpt2=gpt2_rows(n_new, repeats), pycode=pycode_rows(n_new, repeats))
    res.update(load_average_before=load_before, load_average_after=os.getloadavg(),
               seconds=time.perf_counter() - t0)
    print(f"[speedups] {res['seconds']:.0f} s; load average {res['load_average_after'][0]:.1f} at the end", flush=True)
    return res
