"""Serving through Ray Serve's gRPC proxy vs the standalone inference service, in one run.

    python bench/serving.py --ray            # (this script) default: 16 clients, GPT-2 vocabulary, preset small
    python bench/serving_ray.py --quick      # fewer requests, for a smoke run

The workload is ``bench/serving.py``'s: N concurrent streaming clients (16 by default), distinct
~32-token prompts, greedy, ``max_tokens`` new tokens with end-of-text ignored. It runs against

* ``python -m services.inference`` in its own process (what ``lmstack serve`` runs): the reference;
* ``deploy/serve.yaml`` on a local one-node Ray cluster, through Serve's gRPC proxy and the
  ``Gateway`` ingress to the ``Inference`` deployment, with 1 replica and then 2 (fixed counts, no
  autoscaling, same engine settings), clients sending ``application: lmstack``.

Per level the two run back to back, repeated, and the ratio Ray/standalone is taken per repeat
(paired: same machine load), then the median. Ray's overhead is the proxy hop, the gateway hop and
Ray's object transfer per streamed chunk. On a 2-core machine a second replica has no core of its
own, so per-replica throughput (tokens/s / replicas) is reported too: that, not the total, is what
a replica adds on a machine with cores to spare.

Writes ``bench/results/serving_ray.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402
from serving import free_port, make_model, prompts, run_clients, spawn, stop, write_report  # noqa: E402
from vocab import bench_vocabulary  # noqa: E402

from services.client import AsyncClient, Client  # noqa: E402


def ray_config(model_dir: Path, store: Path, grpc_port: int, replicas: int, max_batch: int, threads: int) -> dict:
    """deploy/serve.yaml with fixed replica counts, this machine's ports and the bench model."""
    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    config["grpc_options"]["port"] = grpc_port
    (app,) = config["applications"]
    app["args"].update(models=f"bench={model_dir}", model_store=str(store), max_batch_size=max_batch,
                       max_waiting=1024, torch_threads=threads, num_workers=0,
                       redis_url=f"redis://127.0.0.1:{free_port()}/0")  # no Redis: the job API idles
    deployments = []
    for d in app["deployments"]:
        if d["name"] == "FineTuneWorker":
            continue
        d = copy.deepcopy(d)
        d.pop("autoscaling_config", None)
        d["num_replicas"] = replicas if d["name"] == "Inference" else 1
        deployments.append(d)
    app["deployments"] = deployments
    return config


async def measure(target: str, application: str | None, n: int, per_client: int, prompt_ids, max_tokens: int):
    async with AsyncClient(target, application=application) as c:
        async def stream(i):
            async for chunk in c.complete_stream(prompt_ids[i % len(prompt_ids)], max_tokens=max_tokens,
                                                 temperature=0, ignore_eos=True):
                yield list(chunk.token_ids)

        await run_clients(n, 1, stream)  # warm-up
        return await run_clients(n, per_client, stream)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ray", action="store_true", help=argparse.SUPPRESS)  # bench/serving.py --ray lands here
    ap.add_argument("--preset", default="small")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=2, help="requests per client per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--replicas", default="1,2", help="Inference replica counts to run")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_ray.json"))
    args = ap.parse_args()
    if args.quick:
        args.per_client, args.repeats, args.max_tokens, args.replicas = 1, 1, 32, "1"
    import ray
    from ray import serve

    from deploy.ray_serve import APPLICATION, run_config
    from lmcore import Tokenizer

    prompt_ids = prompts(Tokenizer.from_file(bench_vocabulary()[0]), 64)
    report: dict = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
                    "config": vars(args), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = Path(tmp) / "bench-model", Path(tmp) / "store"
        make_model(model_dir, args.preset)
        store.mkdir()
        port = free_port()
        proc = spawn([sys.executable, "-m", "services.inference", "--port", str(port), "--models",
                      f"bench={model_dir}", "--max-batch-size", str(args.max_batch_size), "--max-waiting", "1024",
                      "--torch-threads", str(args.torch_threads), "--log-level", "WARNING"])
        standalone = f"127.0.0.1:{port}"
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}})
        try:
            with Client(standalone) as c:
                c.wait_ready(180)
            grpc_port = free_port()
            for replicas in [int(x) for x in args.replicas.split(",")]:
                run_config(ray_config(model_dir, store, grpc_port, replicas, args.max_batch_size,
                                      args.torch_threads), timeout_s=600)
                target = f"127.0.0.1:{grpc_port}"
                deadline = time.monotonic() + 120
                while True:  # the proxy learns the application's routes a moment after RUNNING
                    try:
                        with Client(target, application=APPLICATION) as c:
                            c.list_models(timeout=30)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                runs = {"standalone": [], "ray": []}
                for rep in range(args.repeats):
                    runs["standalone"].append(asyncio.run(measure(standalone, None, args.clients, args.per_client,
                                                                  prompt_ids, args.max_tokens)))
                    runs["ray"].append(asyncio.run(measure(target, APPLICATION, args.clients, args.per_client,
                                                           prompt_ids, args.max_tokens)))
                    print(f"  {replicas} replica(s), repeat {rep + 1}: standalone "
                          f"{runs['standalone'][-1]['tokens_per_s']:.1f} tok/s, Ray {runs['ray'][-1]['tokens_per_s']:.1f}",
                          flush=True)
                pairs = list(zip(runs["ray"], runs["standalone"]))
                row = {"replicas": replicas, "clients": args.clients,
                       **{where: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for where, rs in runs.items()},
                       "tokens_per_s_ratio": statistics.median(r["tokens_per_s"] / s["tokens_per_s"] for r, s in pairs),
                       "ttft_p50_ratio": statistics.median(r["ttft_p50_ms"] / s["ttft_p50_ms"] for r, s in pairs),
                       "ttft_p99_ratio": statistics.median(r["ttft_p99_ms"] / s["ttft_p99_ms"] for r, s in pairs),
                       "runs": runs}
                row["ray_tokens_per_s_per_replica"] = row["ray"]["tokens_per_s"] / replicas
                row["overhead_pct"] = 100 * (1 - row["tokens_per_s_ratio"])
                report["rows"].append(row)
                serve.delete(APPLICATION)
        finally:
            serve.shutdown()
            ray.shutdown()
            stop(proc)

    print(f"\nRay Serve vs standalone: preset={args.preset}, {args.clients} streaming clients, {args.max_tokens} "
          f"new tokens, greedy, max_batch_size={args.max_batch_size}; medians of {args.repeats} repeats, ratios "
          "Ray/standalone per repeat (paired)")
    hdr = (f"{'replicas':>8} | {'where':<10} | {'tok/s':>8} | {'tok/s/replica':>13} | {'TTFT p50':>9} | "
           f"{'TTFT p99':>9}")
    print(hdr + "\n" + "-" * len(hdr))
    for row in report["rows"]:
        for where in ("standalone", "ray"):
            r = row[where]
            per = r["tokens_per_s"] / (row["replicas"] if where == "ray" else 1)
            print(f"{row['replicas']:>8} | {where:<10} | {r['tokens_per_s']:>8.1f} | {per:>13.1f} | "
                  f"{r['ttft_p50_ms']:>7.1f}ms | {r['ttft_p99_ms']:>7.1f}ms")
        print(f"{'':>8} | {'Ray/alone':<10} | {row['tokens_per_s_ratio']:>8.3f} | {'':>13} | "
              f"{row['ttft_p50_ratio']:>8.2f}x | {row['ttft_p99_ratio']:>8.2f}x  (tok/s overhead "
              f"{row['overhead_pct']:+.1f}%)")
    write_report(report, Path(args.out))

if __name__ == "__main__":
    main()
