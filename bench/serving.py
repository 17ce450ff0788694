"""Serving benchmark: the gRPC inference service vs the same workload on the in-process engine,
and the tokenizer service's Encode vs a bare echo RPC on the same server stack.

    python bench/serving.py                 # default: GPT-2 vocabulary, 4 layers x 256 wide
    python bench/serving.py --preset gpt2   # GPT-2-small shape (slow on 2 cores)
    python bench/serving.py --quick         # fewer requests, for a smoke run
    python bench/serving.py --ray           # 16 clients through Ray Serve's proxy vs the service (serving_ray.py)

Part 1, generation. N concurrent streaming clients (1, 4, 16, 32), each running requests back to
back (distinct ~32-token prompts, greedy, ``max_tokens`` new tokens, end-of-text ignored so every
request is the same length). Measured per request: time to first token (TTFT) and time per output
token after the first (TPOT); per run: aggregate generated tokens/s. The same workload then runs in
a fresh process on ``lmcore``'s ``AsyncEngine`` (N asyncio clients) and on the bare ``Engine``
(one thread calling ``step()``, closed-loop clients: the floor), over the same checkpoint with the
same batch size and torch threads, in a second long-lived process (the server's twin): the ratio service/in-process is the cost of the service
(protobuf, gRPC, HTTP/2, the clients' process). The server is the real
``python -m services.inference`` in its own process; the clients use ``grpc.aio`` from this one.

HTTP row: the same streaming workload over the OpenAI-compatible API (``POST /v1/completions``
with ``stream: true``, server-sent events, token-id prompts, ``stream_options.include_usage`` for
the token count) on the same server process and engine (``--http-port``), run right after the gRPC
``CompleteStream`` run of each repeat; reported as HTTP/gRPC ratios of tokens/s and TTFT (target:
HTTP overhead <= 15%). The HTTP clients are aiohttp (lean, like grpc.aio), not the openai package,
so the client's own parsing does not count as server overhead.

Part 2, round trips. Sequential unary ``Encode`` calls of a 100-character text against a
tokenizer server that also serves an ``Echo`` RPC (an empty handler, same interceptors: error
boundary, auth check, metrics), in alternating blocks. The ratio of p50 latencies is what
tokenizing adds to a bare round trip.

Threads: the engine's step thread runs torch with ``--torch-threads`` (default 1) intra-op threads,
leaving the second core to gRPC and the clients.

Writes ``bench/results/serving.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from services import protogen  # noqa: E402

protogen.generate()

from vocab import bench_vocabulary  # noqa: E402  (bench/vocab.py)

from services.client import AsyncClient, Client  # noqa: E402
from services.gen.lmstack.v1 import tokenizer_pb2  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "or has had not but what all when there can more one about so out up into than them time only "
         "new some could these two may first then do any like my now over such our man me even most").split()
ECHO_METHOD = "/lmstack.bench.Echo/Echo"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) used so far by a process (default: this one)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def make_model(path: Path, preset: str) -> None:
    from lmcore import GPT, GPTConfig, Tokenizer, save_pretrained

    tok = Tokenizer.from_file(bench_vocabulary()[0])
    torch.manual_seed(0)
    overrides = {"vocab_size": tok.vocab_size}
    if preset == "small":
        overrides["block_size"] = 256
    cfg = GPTConfig.from_preset(preset, **overrides)
    save_pretrained(GPT(cfg), path, tokenizer=tok)


def prompts(tok, n: int, length: int = 32) -> list[list[int]]:
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(length * 2))
        out.append(tok.encode(text)[:length])
    return out


# --- part 1: generation ----------------------------------------------------------------------------
async def run_clients(n_clients: int, per_client: int, submit) -> dict:
    """``submit(i)`` -> async iterator of token-id lists; returns latencies and throughput."""
    ttft, tpot, tokens, chunks = [], [], 0, 0

    async def client(c: int):
        nonlocal tokens, chunks
        for r in range(per_client):
            start = time.perf_counter()
            first = last = None
            n = 0
            async for ids in submit(c * per_client + r):
                chunks += 1
                if ids:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += len(ids)
            ttft.append(first - start)
            if n > 1:
                tpot.append((last - first) / (n - 1))
            tokens += n

    start, cpu0 = time.perf_counter(), process_cpu_s()
    await asyncio.gather(*(client(c) for c in range(n_clients)))
    wall = time.perf_counter() - start
    return {"requests": n_clients * per_client, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "cpu_ms_per_token": 1e3 * (process_cpu_s() - cpu0) / tokens,
            "tokens_per_chunk": tokens / chunks,  # > 1 where a lagging stream got tokens merged (coalescing)
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99)}


def run_engine_loop(engine, n_clients: int, per_client: int, prompt_ids, params) -> dict:
    """The bare Engine: one thread calling ``step()``, N closed-loop clients (a finished request's
    client submits its next at once). No asyncio, no threads, no transport: the floor of overhead."""
    ttft, tpot, tokens = [], [], 0
    sent = [0] * n_clients
    state: dict[str, list] = {}

    def submit(c: int) -> None:
        i = c * per_client + sent[c]
        sent[c] += 1
        rid = engine.add_request(prompt_ids[i % len(prompt_ids)], params)
        state[rid] = [c, time.perf_counter(), None, None, 0]

    start, cpu0 = time.perf_counter(), process_cpu_s()
    for c in range(n_clients):
        submit(c)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            st = state[o.request_id]
            if o.new_token_ids:
                st[2] = st[2] or now
                st[3] = now
                st[4] += len(o.new_token_ids)
            if o.finished:
                c, t0, first, last, n = state.pop(o.request_id)
                ttft.append(first - t0)
                if n > 1:
                    tpot.append((last - first) / (n - 1))
                tokens += n
                if sent[c] < per_client:
                    submit(c)
    wall = time.perf_counter() - start
    return {"requests": n_clients * per_client, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "cpu_ms_per_token": 1e3 * (process_cpu_s() - cpu0) / tokens,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99)}


async def reference_worker(model_dir: Path, max_tokens: int, max_batch: int, threads: int) -> None:
    """The in-process references, in a long-lived process of their own (like the server, so both have
    the same history: warm caches, touched KV pages). One AsyncEngine and one bare Engine, built
    once; each stdin line ``[n_clients, per_client]`` runs both and answers one JSON line."""
    from lmcore import Engine, SamplingParams, Tokenizer, load_model
    from lmcore.engine import AsyncEngine

    torch.set_num_threads(threads)
    prompt_ids = prompts(Tokenizer.from_file(bench_vocabulary()[0]), 64)
    model = load_model(model_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine = AsyncEngine(Engine(model, tokenizer=model.tokenizer, max_batch_size=max_batch, max_waiting=1024),
                         num_threads=threads)
    engine.start()
    bare = Engine(model, tokenizer=model.tokenizer, max_batch_size=max_batch, max_waiting=1024)

    async def in_process(i):
        async for out in engine.stream(prompt_ids[i % len(prompt_ids)], params):
            yield out.new_token_ids

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n, per_client = json.loads(line)
        await run_clients(n, 1, in_process)  # warm-up
        result = {"async_engine": await run_clients(n, per_client, in_process)}
        run_engine_loop(bare, n, 1, prompt_ids, params)  # warm-up
        result["engine"] = run_engine_loop(bare, n, per_client, prompt_ids, params)
        print(json.dumps(result), flush=True)
    await asyncio.to_thread(engine.stop)


def http_submitter(session, url: str, prompt_ids, max_tokens: int):
    """``submit(i)`` over ``POST /v1/completions`` (SSE): one item per event that carries text, then
    the rest of the usage count (a lagging stream's events carry several tokens each)."""

    async def submit(i):
        body = {"model": "bench", "prompt": prompt_ids[i % len(prompt_ids)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        seen = 0
        async with session.post(url, json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if event["choices"]:
                    seen += 1
                    yield [0]
                elif event.get("usage"):
                    yield [0] * max(0, event["usage"]["completion_tokens"] - seen)

    return submit


async def bench_generation(target: str, server_pid: int, model_dir: Path, levels, per_client, max_tokens, max_batch, threads,
                           prompt_ids, repeats: int, http_url: str | None = None) -> dict:
    """Per level and repeat: the service, then the AsyncEngine and the bare Engine (in the reference
    process), back to back so the three see the same machine load (this machine is shared; the
    repeats show how much that moves the figures)."""
    runs: dict = {n: {"service": [], "async_engine": [], "engine": []} | ({"http": []} if http_url else {})
                  for n in levels}
    session = None
    if http_url:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    worker = subprocess.Popen([sys.executable, __file__, "--reference-worker",
                               json.dumps([str(model_dir), max_tokens, max_batch, threads])],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(worker.stdout.readline())["ready"]
        async with AsyncClient(target) as c:
            async def remote(i):
                async for chunk in c.complete_stream(prompt_ids[i % len(prompt_ids)], max_tokens=max_tokens,
                                                     temperature=0, ignore_eos=True):
                    yield list(chunk.token_ids)

            for n in levels:
                for rep in range(repeats):
                    await run_clients(n, 1, remote)  # warm-up (and connection setup)
                    server_cpu0 = process_cpu_s(server_pid)
                    res = await run_clients(n, per_client(n), remote)
                    # CPU per token of the whole service: the server process plus the clients' (this one).
                    res["client_cpu_ms_per_token"] = res["cpu_ms_per_token"]
                    res["server_cpu_ms_per_token"] = 1e3 * (process_cpu_s(server_pid) - server_cpu0) / res["tokens"]
                    res["cpu_ms_per_token"] = res["client_cpu_ms_per_token"] + res["server_cpu_ms_per_token"]
                    runs[n]["service"].append(res)
                    if session is not None:  # the same workload over the OpenAI-compatible API (SSE)
                        submit = http_submitter(session, http_url, prompt_ids, max_tokens)
                        await run_clients(n, 1, submit)  # warm-up
                        server_cpu0 = process_cpu_s(server_pid)
                        res = await run_clients(n, per_client(n), submit)
                        res["server_cpu_ms_per_token"] = 1e3 * (process_cpu_s(server_pid) - server_cpu0) / res["tokens"]
                        res["cpu_ms_per_token"] += res["server_cpu_ms_per_token"]
                        runs[n]["http"].append(res)
                    worker.stdin.write(json.dumps([n, per_client(n)]) + "\n")
                    worker.stdin.flush()
                    ref = json.loads(await asyncio.to_thread(worker.stdout.readline))
                    runs[n]["async_engine"].append(ref["async_engine"])
                    runs[n]["engine"].append(ref["engine"])
                    r = {k: v[-1]["tokens_per_s"] for k, v in runs[n].items()}
                    print(f"  {n:>2} clients, repeat {rep + 1}: service {r['service']:.1f} tok/s, "
                          f"AsyncEngine {r['async_engine']:.1f}, Engine {r['engine']:.1f}", flush=True)
    finally:
        worker.stdin.close()
        worker.wait(60)
        if session is not None:
            await session.close()
    return runs


def summarize(runs: list[dict]) -> dict:
    """Median of each figure over the repeats."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def ratios(runs: dict, ref: str) -> dict:
    """Service / reference, per repeat (paired: same load), then the median."""
    out = {}
    for key, name in (("tokens_per_s", "tokens_per_s_ratio"), ("ttft_p50_ms", "ttft_p50_ratio"),
                      ("tpot_p50_ms", "tpot_p50_ratio"), ("tpot_p99_ms", "tpot_p99_ratio"),
                      ("cpu_ms_per_token", "cpu_per_token_ratio")):
        out[name] = statistics.median(s[key] / r[key] for s, r in zip(runs["service"], runs[ref]))
    out["overhead_pct"] = 100 * (1 - out["tokens_per_s_ratio"])
    return out


def http_ratios(runs: dict) -> dict:
    """HTTP (SSE) / gRPC (CompleteStream) per repeat, then the median."""
    pairs = list(zip(runs["http"], runs["service"]))
    out = {name: statistics.median(h[key] / g[key] for h, g in pairs)
           for key, name in (("tokens_per_s", "tokens_per_s_ratio"), ("ttft_p50_ms", "ttft_p50_ratio"),
                             ("tpot_p50_ms", "tpot_p50_ratio"),
                             ("server_cpu_ms_per_token", "server_cpu_per_token_ratio"))}
    out["overhead_pct"] = 100 * (1 - out["tokens_per_s_ratio"])
    return out


# --- part 2: round trips ---------------------------------------------------------------------------
def serve_tokenizer_with_echo(port: int) -> None:
    """Child process: the tokenizer service plus an Echo RPC on the same GrpcServer stack."""
    from services.config import TokenizerSettings
    from services.server import GrpcServer
    from services.tokenizer.__main__ import setup

    async def echo(request, context):
        return tokenizer_pb2.EncodeResponse()

    async def main():
        settings = TokenizerSettings(models=[f"gpt2={bench_vocabulary()[0]}"], port=port, log_level="WARNING")
        server = GrpcServer(settings, "tokenizer")
        ready, cleanup = await setup(server)
        server.add_generic_handlers([grpc.method_handlers_generic_handler("lmstack.bench.Echo", {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo, request_deserializer=tokenizer_pb2.EncodeRequest.FromString,
                response_serializer=tokenizer_pb2.EncodeResponse.SerializeToString)})])
        await server.start()
        await ready()
        await server.set_serving(True)
        await server.wait_for_signal()
        await cleanup()

    asyncio.run(main())


def bench_round_trips(target: str, calls: int, text: str) -> dict:
    with Client(target) as c:
        c.wait_ready(60)
        encode = c.tokenizer.Encode
        echo = c.channel.unary_unary(ECHO_METHOD, request_serializer=tokenizer_pb2.EncodeRequest.SerializeToString,
                                     response_deserializer=tokenizer_pb2.EncodeResponse.FromString)
        req = tokenizer_pb2.EncodeRequest(text=text)
        lat = {"encode": [], "echo": []}
        for _ in range(200):  # warm-up
            encode(req)
            echo(req)
        block = 100
        for _ in range(max(1, calls // block)):
            for name, fn in (("encode", encode), ("echo", echo)):
                for _ in range(block):
                    t = time.perf_counter()
                    fn(req, timeout=10)
                    lat[name].append(time.perf_counter() - t)
    out = {}
    for name, xs in lat.items():
        out[name] = {"calls": len(xs), "p50_ms": 1e3 * pct(xs, 50), "p99_ms": 1e3 * pct(xs, 99),
                     "round_trips_per_s": len(xs) / sum(xs)}
    return out


def spawn(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    if "--ray" in sys.argv[1:]:  # the same workload through Ray Serve's proxy vs the service: its own script
        from serving_ray import main as ray_main

        return ray_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="GPTConfig preset (vocab set to GPT-2's 50257)")
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client (at least 16 per level)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per level (medians are reported)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--encode-calls", type=int, default=2000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-http", action="store_true", help="skip the OpenAI-compatible HTTP (SSE) row")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving.json"))
    ap.add_argument("--serve-tokenizer-echo", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--reference-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_worker:
        model_dir, max_tokens, max_batch, threads = json.loads(args.reference_worker)
        asyncio.run(reference_worker(Path(model_dir), max_tokens, max_batch, threads))
        return
    if args.serve_tokenizer_echo:
        serve_tokenizer_with_echo(args.serve_tokenizer_echo)
        return
    if args.quick:
        args.rounds, args.encode_calls, args.max_tokens, args.repeats = 1, 400, 32, 1
    torch.set_num_threads(args.torch_threads)
    levels = [int(x) for x in args.clients.split(",")]

    def per_client(n: int) -> int:
        return max(args.rounds, -(-16 // n)) if not args.quick else 1  # ceil(16 / n)

    from lmcore import Tokenizer

    tok = Tokenizer.from_file(bench_vocabulary()[0])
    prompt_ids = prompts(tok, 64)
    report: dict = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                                "python": platform.python_version(),
                                "torch": torch.__version__, "grpc": grpc.__version__},
                    "config": {k: v for k, v in vars(args).items()
                               if k not in ("serve_tokenizer_echo", "reference_worker")}}

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "bench-model"
        make_model(model_dir, args.preset)
        # part 1: the service (its own process) and the same workload in-process, level by level
        port, http_port = free_port(), (0 if args.no_http else free_port())
        proc = spawn([sys.executable, "-m", "services.inference", "--port", str(port), "--http-port", str(http_port),
                      "--models", f"bench={model_dir}", "--max-batch-size", str(args.max_batch_size),
                      "--max-waiting", "1024", "--torch-threads", str(args.torch_threads),
                      "--log-level", "WARNING"])
        try:
            with Client(f"127.0.0.1:{port}") as c:
                c.wait_ready(600)  # a loaded machine: building the fast weight layouts takes a while
            runs = asyncio.run(bench_generation(
                f"127.0.0.1:{port}", proc.pid, model_dir, levels, per_client, args.max_tokens, args.max_batch_size,
                args.torch_threads, prompt_ids, args.repeats,
                f"http://127.0.0.1:{http_port}/v1/completions" if http_port else None))
        finally:
            stop(proc)

    # part 2: Encode vs echo
    port = free_port()
    proc = spawn([sys.executable, __file__, "--serve-tokenizer-echo", str(port)])
    try:
        text = ("The quick brown fox jumps over the lazy dog; " * 4)[:100]
        rt = bench_round_trips(f"127.0.0.1:{port}", args.encode_calls, text)
    finally:
        stop(proc)

    gen_rows = []
    for n in levels:
        gen_rows.append({"clients": n, **{k: summarize(v) for k, v in runs[n].items()},
                         "vs_engine": ratios(runs[n], "engine"), "vs_async_engine": ratios(runs[n], "async_engine"),
                         **({"http_vs_grpc": http_ratios(runs[n])} if "http" in runs[n] else {}),
                         "runs": runs[n]})
    report["generation"] = gen_rows
    report["round_trips"] = {**rt, "encode_over_echo_p50": rt["encode"]["p50_ms"] / rt["echo"]["p50_ms"]}

    print(f"\nGeneration: preset={args.preset} (vocab 50257), {args.max_tokens} new tokens, greedy, "
          f"max_batch_size={args.max_batch_size}, torch threads={args.torch_threads}; medians of "
          f"{args.repeats} repeats; ratios are service/reference per repeat (paired), median")
    hdr = (f"{'clients':>7} | {'where':<11} | {'tok/s':>8} | {'TTFT p50':>9} | {'TTFT p99':>9} | "
           f"{'TPOT p50':>9} | {'TPOT p99':>9} | {'CPU/token':>9}")
    print(hdr + "\n" + "-" * len(hdr))
    for row in gen_rows:
        for where, r in (("service", row["service"]), *((("http (SSE)", row["http"]),) if "http" in row else ()),
                         ("AsyncEngine", row["async_engine"]), ("Engine", row["engine"])):
            print(f"{row['clients']:>7} | {where:<11} | {r['tokens_per_s']:>8.1f} | {r['ttft_p50_ms']:>7.1f}ms | "
                  f"{r['ttft_p99_ms']:>7.1f}ms | {r['tpot_p50_ms']:>7.2f}ms | {r['tpot_p99_ms']:>7.2f}ms | "
                  f"{r['cpu_ms_per_token']:>7.2f}ms" + (f"  ({r['tokens_per_chunk']:.2f} tokens/chunk)"
                                                          if "tokens_per_chunk" in r and where != "http (SSE)" else ""))
        if "http_vs_grpc" in row:
            v = row["http_vs_grpc"]
            print(f"{'':>7} | {'http/gRPC':<11} | {v['tokens_per_s_ratio']:>8.3f} | {v['ttft_p50_ratio']:>8.2f}x | "
                  f"{'':>9} | {v['tpot_p50_ratio']:>8.2f}x | {'':>9} | {'':>9}  "
                  f"(HTTP overhead {v['overhead_pct']:+.1f}%, target <= 15%; server CPU/token "
                  f"{v['server_cpu_per_token_ratio']:.2f}x)")
        for ref in ("engine", "async_engine"):
            v = row["vs_" + ref]
            label = "svc/Engine" if ref == "engine" else "svc/Async"
            print(f"{'':>7} | {label:<11} | {v['tokens_per_s_ratio']:>8.3f} | {v['ttft_p50_ratio']:>8.2f}x | "
                  f"{'':>9} | {v['tpot_p50_ratio']:>8.2f}x | {'':>9} | {v['cpu_per_token_ratio']:>8.2f}x  "
                  f"(tok/s overhead {v['overhead_pct']:+.1f}%)")
    print(f"\nRound trips ({args.encode_calls} sequential calls each, 100-char text):")
    for name in ("encode", "echo"):
        r = rt[name]
        print(f"  {name:<7} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  {r['round_trips_per_s']:.0f}/s")
    print(f"  Encode p50 / echo p50 = {report['round_trips']['encode_over_echo_p50']:.3f} (target <= 1.3)")

    write_report(report, Path(args.out))


def write_report(report: dict, out: Path) -> None:
    """Note the load average at the end (this machine is shared), print it and write the JSON."""
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {report['machine']['load_average_at_start']}, "
          f"at end {report['machine']['load_average_at_end']} on {os.cpu_count()} cores")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
