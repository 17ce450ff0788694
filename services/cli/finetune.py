"""``lmstack finetune``: upload datasets and run fine-tuning jobs against the fine-tuning service.

    lmstack finetune upload train.jsonl                         -> ds-1a2b3c4d5e6f (120 records, 9,345 tokens)
    lmstack finetune create --model pycode --dataset train.jsonl --method lora --max-steps 200 --watch
    lmstack finetune list [--status running] [--limit 20]
    lmstack finetune get ftjob-...        lmstack finetune watch ftjob-...     lmstack finetune cancel ftjob-...
    lmstack finetune checkpoints ftjob-...

``--dataset`` takes a dataset id or a JSONL path (uploaded first). ``watch`` (and ``create
--watch``) prints events as they happen and exits 0 when the job succeeds, 1 when it fails or is
cancelled. Server errors print as one line with exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import grpc

from lmcore._io import atomic_write

from .client_cmds import tls_args, tls_kwargs

FINETUNE_ADDR = os.environ.get("LMSTACK_FINETUNE_ADDR", "127.0.0.1:50053")


def _connection_args(p, defaults: bool) -> None:
    """--addr, --api-key, --timeout. On the ``finetune`` parser with their defaults, and again on every
    action with ``SUPPRESS`` defaults, so they work wherever a user types them
    (``lmstack finetune --addr X list`` and ``lmstack finetune list --addr X`` alike)."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--addr", default=default(FINETUNE_ADDR),
                   help=f"fine-tuning service address (default {FINETUNE_ADDR}, or $LMSTACK_FINETUNE_ADDR)")
    p.add_argument("--api-key", default=default(os.environ.get("LMSTACK_API_KEY")),
                   help="API key sent as 'authorization: Bearer KEY' (default $LMSTACK_API_KEY)")
    p.add_argument("--timeout", type=float, default=default(120.0),
                   help="seconds per call before giving up (default 120)")
    p.add_argument("--application", default=default(os.environ.get("LMSTACK_APPLICATION") or None),
                   help="behind Ray Serve's gRPC proxy: the Serve application (lmstack in deploy/serve.yaml; "
                        "default $LMSTACK_APPLICATION)")
    tls_args(p, default)


def add_arguments(p) -> None:
    _connection_args(p, defaults=True)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    up = sub.add_parser("upload", help="upload a JSONL dataset ({'prompt','completion'} or {'text'} per line)")
    up.add_argument("file", help="the JSONL file")
    up.add_argument("--model", default="", help="model whose tokenizer counts tokens (default: the server's)")

    cr = sub.add_parser("create", help="queue a fine-tuning job")
    cr.add_argument("--model", required=True, help="base model name")
    cr.add_argument("--dataset", required=True, help="dataset id (ds-...) or a JSONL file to upload first")
    cr.add_argument("--method", choices=["lora", "full"], default="lora", help="default: lora")
    cr.add_argument("--suffix", default="", help="name part of the result, ft:<model>:<suffix>:<id>")
    cr.add_argument("--idempotency-key", default="", help="retrying with the same key never creates a second job")
    cr.add_argument("--epochs", type=int)
    cr.add_argument("--max-steps", type=int)
    cr.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float)
    cr.add_argument("--batch-size", type=int)
    cr.add_argument("--grad-accum", dest="grad_accum_steps", type=int)
    cr.add_argument("--seed", type=int)
    cr.add_argument("--warmup", dest="warmup_steps", type=int)
    cr.add_argument("--weight-decay", type=float)
    cr.add_argument("--lora-rank", type=int)
    cr.add_argument("--lora-alpha", type=float)
    cr.add_argument("--lora-dropout", type=float)
    cr.add_argument("--lora-targets", dest="lora_target_modules",
                    help="comma-separated: attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj (or c_attn, c_proj, attn, "
                         "mlp, all)")
    cr.add_argument("--merge", dest="merge_lora", action="store_true", default=None,
                    help="LORA: publish the adapter merged into the base weights (a full model)")
    cr.add_argument("--eval-fraction", type=float)
    cr.add_argument("--eval-interval", type=int)
    cr.add_argument("--checkpoint-interval", type=int)
    cr.add_argument("--log-interval", type=int)
    cr.add_argument("--watch", action="store_true", help="follow the job until it ends")

    ls = sub.add_parser("list", help="list jobs, newest first")
    ls.add_argument("--status", action="append", default=[],
                    help="only queued|running|succeeded|failed|cancelled (repeatable)")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--page-token", default="")

    for name, help_text in (("get", "show a job"), ("watch", "follow a job's events until it ends"),
                            ("cancel", "cancel a queued or running job"),
                            ("checkpoints", "list a job's checkpoints")):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("job_id")
    for action in sub.choices.values():
        _connection_args(action, defaults=False)


HP_ARGS = ("epochs", "max_steps", "learning_rate", "batch_size", "grad_accum_steps", "seed", "warmup_steps",
           "weight_decay", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "eval_fraction",
           "eval_interval", "checkpoint_interval", "log_interval", "merge_lora")


def run(args) -> int:
    from services.finetune.client import FineTuneClient

    try:
        with FineTuneClient(args.addr, api_key=args.api_key, timeout=args.timeout,
                            application=args.application, **tls_kwargs(args)) as client:
            return ACTIONS[args.action](client, args)
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
        if code == grpc.StatusCode.UNAVAILABLE and "Redis" not in (details or ""):
            return _fail(args, f"cannot reach the fine-tuning service at {args.addr} ({details}); is `lmstack "
                               "serve` running? (--addr to point elsewhere)")
        return _fail(args, f"{code.name}: {details}")
    except (ValueError, TypeError, OSError) as e:
        return _fail(args, str(e))
    except BrokenPipeError:
        return 0


def _fail(args, message: str) -> int:
    print(f"lmstack finetune {args.action}: {message}", file=sys.stderr)
    return 1


# --- actions -------------------------------------------------------------------------------------------
def _upload(client, args) -> int:
    data = Path(args.file).read_bytes()
    ds = client.upload_dataset(data, filename=Path(args.file).name, model=args.model)
    cache = UploadCache()
    cache.put(cache.key(args.addr, args.model, data), ds.id)  # a later `create --dataset FILE` reuses it
    print(f"{ds.id}  {ds.examples:,} records, {ds.tokens:,} tokens ({ds.filename}, counted with {ds.model})")
    return 0


class UploadCache:
    """Which dataset id a file's exact bytes were uploaded as, per server and model, so ``create
    --dataset FILE`` uploads a file once, not on every job. ``$XDG_CACHE_HOME/lmstack/datasets.json``
    (default ``~/.cache``); an entry is used only after the server confirms the dataset still exists."""

    def __init__(self):
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.path = root / "lmstack" / "datasets.json"

    @staticmethod
    def key(addr: str, model: str, data: bytes) -> str:
        return f"{addr}|{model}|{hashlib.sha256(data).hexdigest()}"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self.path.read_text()).get(key)
        except (OSError, ValueError):
            return None

    def put(self, key: str, dataset_id: str) -> None:
        try:
            entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = dataset_id
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(entries, indent=1) + "\n")
        except OSError:
            pass  # a cache that cannot be written only costs a re-upload next time


def _dataset_for(client, args) -> str:
    """``--dataset``: an id as given, or a JSONL file uploaded unless these bytes already were."""
    dataset = args.dataset
    if dataset.startswith("ds-") and not Path(dataset).is_file():
        return dataset
    try:
        data = Path(dataset).read_bytes()
    except OSError as e:
        raise ValueError(f"{dataset}: {e.strerror} (give a dataset id ds-... or a JSONL file)") from None
    cache = UploadCache()
    key = cache.key(args.addr, args.model, data)
    known = cache.get(key)
    if known is not None:
        try:
            client.get_dataset(known)
            print(f"{dataset} was already uploaded as {known} (same bytes); not uploading again")
            return known
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
    ds = client.upload_dataset(data, filename=Path(dataset).name, model=args.model)
    print(f"uploaded {dataset}: {ds.id} ({ds.examples:,} records, {ds.tokens:,} tokens)")
    cache.put(key, ds.id)
    return ds.id


def _create(client, args) -> int:
    dataset = _dataset_for(client, args)
    hp = {name: getattr(args, name) for name in HP_ARGS}
    job = client.create_job(args.model, dataset, method=args.method.upper(), suffix=args.suffix,
                            idempotency_key=args.idempotency_key, **hp)
    print(f"{job.id}  {_status(job.status)}  {job.total_steps} steps")
    if args.watch:
        return _watch_id(client, job.id)
    return 0


def _list(client, args) -> int:
    resp = client.list_jobs(statuses=args.status, page_size=args.limit, page_token=args.page_token)
    if not resp.jobs:
        print("no jobs")
    for job in resp.jobs:
        print(f"{job.id}  {_status(job.status):<10} {job.step:>6}/{job.total_steps:<6} {job.base_model}  "
              f"{job.fine_tuned_model or '-'}  {_when(job.created_at)}")
    if resp.next_page_token:
        print(f"more: --page-token {resp.next_page_token}")
    return 0


def _get(client, args) -> int:
    from google.protobuf.json_format import MessageToJson

    print(MessageToJson(client.get_job(args.job_id), indent=2))
    return 0


def _watch(client, args) -> int:
    return _watch_id(client, args.job_id)


def _watch_id(client, job_id: str) -> int:
    for event in client.watch_job(job_id, timeout=None):
        print(f"{_when(event.created_at)}  {event.message}", flush=True)
    job = client.get_job(job_id)
    if job.fine_tuned_model:
        print(f"fine-tuned model: {job.fine_tuned_model}")
    if job.error.message:
        print(f"error: {job.error.message}", file=sys.stderr)
    return 0 if _status(job.status) == "succeeded" else 1


def _cancel(client, args) -> int:
    job = client.cancel_job(args.job_id)
    state = "cancellation requested (stops after the current step)" if job.cancel_requested and \
        _status(job.status) == "running" else _status(job.status)
    print(f"{job.id}  {state}")
    return 0


def _checkpoints(client, args) -> int:
    cps = client.list_checkpoints(args.job_id)
    if not cps:
        print("no checkpoints")
    for cp in cps:
        loss = f"{cp.train_loss:.4f}" if cp.HasField("train_loss") else "-"
        print(f"step {cp.step:>6}  loss {loss}  {cp.trained_tokens:,} tokens  {cp.path}")
    return 0


def _status(value: int) -> str:
    from services.finetune.client import status_name

    return status_name(value)


def _when(ts) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime().strftime("%H:%M:%S")


ACTIONS = {"upload": _upload, "create": _create, "list": _list, "get": _get, "watch": _watch, "cancel": _cancel,
           "checkpoints": _checkpoints}
