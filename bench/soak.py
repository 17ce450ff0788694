"""Soak: 64 well-formed streams against ``python -m services.inference`` for 60 s, alone and then
beside a hostile client, with the server's memory sampled throughout.

    python bench/soak.py            # 60 s per phase
    python bench/soak.py --quick    # 10 s per phase

Phase 1 (the reference, same run): ``--streams`` concurrent clients, each running greedy
CompleteStream requests back to back (32-token prompts, ``max_tokens`` 32, end-of-text ignored).
Phase 2: the same clients while one more (in a process of its own) sends, in a loop, the requests issue 18 reproduced as
harmful: temperature 1e-38, repetition_penalty 1e-38, a 4 MiB prompt, 1M prompt ids, seven 1 MiB
stop strings, Score with 64 long choices, a 300-character model name, malformed protobuf.
Reported: per phase, completed streams, errors among them (must be 0), generated tokens/s and its
ratio phase 2 / phase 1, the hostile calls' status codes (never UNKNOWN/INTERNAL), and the server's
RSS after warm-up and at the end (growth must stay under 10%).

Writes ``bench/results/soak.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from services import protogen  # noqa: E402

protogen.generate()

from vocab import bench_vocabulary  # noqa: E402  (bench/vocab.py)

from services.client import AsyncClient, Client  # noqa: E402
from services.gen.lmstack.v1 import inference_pb2  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_model(path: Path) -> None:
    from lmcore import GPT, GPTConfig, Tokenizer, save_pretrained

    tok = Tokenizer.from_file(bench_vocabulary()[0])
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=256, vocab_size=tok.vocab_size)
    save_pretrained(GPT(cfg), path, tokenizer=tok)


async def streams(target: str, n: int, seconds: float, max_tokens: int) -> dict:
    done = collections.Counter()
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    async def client(i: int) -> None:
        async with AsyncClient(target, timeout=120) as c:
            prompt = [(i * 37 + k) % 50000 + 1 for k in range(32)]
            while time.monotonic() < stop_at:
                try:
                    chunks = [ch async for ch in c.complete_stream(prompt, max_tokens=max_tokens, temperature=0,
                                                                   ignore_eos=True)]
                    if chunks[-1].usage.completion_tokens != max_tokens:
                        errors.append(f"short stream: {chunks[-1].usage.completion_tokens}")
                    done["streams"] += 1
                    done["tokens"] += max_tokens
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{e.code().name}: {e.details()[:200]}")

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    return {"streams": done["streams"], "errors": len(errors), "error_samples": errors[:5],
            "tokens_per_s": done["tokens"] / elapsed}


def hostile_requests() -> list:
    sp = inference_pb2.CompleteRequest
    from services.client import sampling_params

    return [
        ("Complete", sp(prompt="hi", sampling=sampling_params(temperature=1e-38, max_tokens=64))),
        ("CompleteStream", sp(prompt="hi", sampling=sampling_params(repetition_penalty=1e-38, max_tokens=64))),
        ("Complete", sp(prompt="x" * (4 << 20), sampling=sampling_params(max_tokens=4))),
        ("Complete", sp(prompt_token_ids=[1] * 1_000_000, sampling=sampling_params(max_tokens=4))),
        ("Complete", sp(prompt="hi", sampling=sampling_params(stop=["s" * (1 << 20)] * 7))),
        ("Score", inference_pb2.ScoreRequest(context="q " * 50, choices=[" answer" * 150] * 64)),
        ("Complete", sp(model="m" * 300, prompt="hi")),
        ("Complete", b"\xff" * 11),
    ]


async def hostile(target: str, seconds: float) -> dict:
    codes = collections.Counter()
    stop_at = time.monotonic() + seconds
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 1 << 27)])
    calls = hostile_requests()
    while time.monotonic() < stop_at:
        for method, req in calls:
            data = req if isinstance(req, bytes) else req.SerializeToString()
            path = f"/lmstack.v1.InferenceService/{method}"
            try:
                if method == "CompleteStream":
                    async for _ in channel.unary_stream(path)(data, timeout=120):
                        pass
                else:
                    await channel.unary_unary(path)(data, timeout=120)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
    await channel.close()
    return dict(codes)


async def hostile_process(target: str, seconds: float) -> dict:
    """The hostile client in a process of its own: serializing its megabytes must not slow this
    process's 64 clients (what is measured is the server)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--hostile", target, "--seconds",
                                                str(seconds), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out.decode().strip().splitlines()[-1])


async def phase(target: str, pid: int, args, with_hostile: bool) -> dict:
    tasks = [streams(target, args.streams, args.seconds, args.max_tokens)]
    if with_hostile:
        tasks.append(hostile_process(target, args.seconds))
    samples = []

    async def sample():
        while True:
            samples.append(rss_mib(pid))
            await asyncio.sleep(1.0)

    sampler = asyncio.ensure_future(sample())
    results = await asyncio.gather(*tasks)
    sampler.cancel()
    out = results[0]
    out["rss_mib_first"], out["rss_mib_last"] = samples[0], samples[-1]
    if with_hostile:
        out["hostile_codes"] = results[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hostile", metavar="TARGET", help=argparse.SUPPRESS)  # the hostile client's process
    args = ap.parse_args()
    if args.hostile:
        print(json.dumps(asyncio.run(hostile(args.hostile, args.seconds))))
        return
    if args.quick:
        args.seconds = 10.0
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_model(model)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "services.inference", "--models", f"soak={model}", "--port",
                                 str(port), "--max-batch-size", "16", "--max-waiting", "128", "--log-level", "WARNING"],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        target = f"127.0.0.1:{port}"
        try:
            Client(target).wait_ready(timeout=300)
            asyncio.run(streams(target, 8, 3.0, args.max_tokens))  # warm-up
            alone = asyncio.run(phase(target, proc.pid, args, with_hostile=False))
            beside = asyncio.run(phase(target, proc.pid, args, with_hostile=True))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    growth = (beside["rss_mib_last"] - alone["rss_mib_first"]) / alone["rss_mib_first"]
    result = {"streams": args.streams, "seconds": args.seconds, "alone": alone, "beside_hostile": beside,
              "tokens_per_s_ratio_beside_vs_alone": beside["tokens_per_s"] / alone["tokens_per_s"],
              "rss_growth": growth}
    print(f"{'phase':<22}{'streams':>9}{'errors':>8}{'tok/s':>9}{'RSS MiB first':>15}{'last':>8}")
    for name, r in (("64 streams alone", alone), ("beside hostile client", beside)):
        print(f"{name:<22}{r['streams']:>9}{r['errors']:>8}{r['tokens_per_s']:>9.0f}{r['rss_mib_first']:>15.0f}"
              f"{r['rss_mib_last']:>8.0f}")
    print(f"tokens/s beside the hostile client / alone: {result['tokens_per_s_ratio_beside_vs_alone']:.2f}; "
          f"RSS growth over both phases: {growth:+.1%}; hostile codes: {beside['hostile_codes']}")
    out = ROOT / "bench" / "results" / "soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
