"""The fine-tuning API's logic: protobuf in, protobuf out, Redis (``redis.asyncio``) underneath.

Transport lives in ``servicer.py``; the Redis schema and the atomic transitions in ``store.py``;
training in ``worker.py``. This class validates everything a worker would trip over (the dataset,
line by line, against the base model's tokenizer and context; every hyperparameter), so that a
job that reaches the queue can only fail for reasons nobody could know in advance.

Tenancy (``services.tenants``): every dataset and job records the tenant that created it; a
member's GetDataset, CreateJob (its dataset), GetJob, WatchJob, CancelJob and ListCheckpoints on
another tenant's id are ``NOT_FOUND`` with the message an unknown id gets, ListJobs reads the
tenant's own index, and idempotency keys are per tenant. Admins see everything. The tenant's
active_jobs, published_models and dataset_bytes quotas are checked inside the Redis scripts that
create (``store.py``), so concurrent requests cannot overshoot them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from lmcore.training import DatasetError
from lmcore.training.data import check_record, parse_record
from services import tenants
from services.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, clip
from services.gen.lmstack.v1 import finetune_pb2 as pb
from services.models import owned_store_models
from services.quotas import exhausted

from .bases import BaseModels
from .settings import FineTuneSettings
from .spec import HyperparameterError, check_model_name, check_suffix, resolve_hyperparameters
from .store import SCRIPTS, STATUSES, TERMINAL, Keys, ensure_group, now, redacted, redis_client

log = logging.getLogger("lmstack.finetune")

METHOD_NAMES = {pb.METHOD_FULL: "FULL", pb.METHOD_LORA: "LORA", pb.METHOD_UNSPECIFIED: "LORA"}
METHOD_VALUES = {"FULL": pb.METHOD_FULL, "LORA": pb.METHOD_LORA}
STATUS_VALUES = {s: getattr(pb, f"JOB_STATUS_{s}") for s in STATUSES}
EVENT_VALUES = {t: getattr(pb, f"JOB_EVENT_TYPE_{t}") for t in ("STATUS", "METRICS", "EVAL", "CHECKPOINT", "INFO")}
OPTIONAL_HP = ("epochs", "max_steps", "learning_rate", "batch_size", "grad_accum_steps", "seed", "warmup_steps",
               "weight_decay", "lora_rank", "lora_alpha", "lora_dropout", "eval_fraction", "eval_interval",
               "checkpoint_interval", "log_interval", "grad_clip", "merge_lora")
FLOAT_HP = {"learning_rate", "weight_decay", "lora_alpha", "lora_dropout", "eval_fraction", "grad_clip"}
MAX_IDEMPOTENCY_KEY = 200
# Ids are checked by pattern before they reach a Redis key: "<job>:events" names another key (of
# another type), so an unchecked id could read or break what it was never meant to.
JOB_ID = re.compile(r"ftjob-[0-9a-f]{12}")
DATASET_ID = re.compile(r"ds-[0-9a-f]{12}")
EVENT_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")  # a Redis stream id
PAGE_TOKEN = re.compile(r"[0-9]{1,20}")


def check_id(value: str, pattern: re.Pattern, what: str, example: str) -> str:
    if not pattern.fullmatch(value):
        raise InvalidArgument(f"{what} {clip(value)} is not valid: expected {example}")
    return value


def job_id(value: str) -> str:
    return check_id(value, JOB_ID, "job id", "'ftjob-' and 12 hex digits")


def dataset_id(value: str) -> str:
    return check_id(value, DATASET_ID, "dataset id", "'ds-' and 12 hex digits (from UploadDataset)")


# --- protobuf conversion (the edge) ------------------------------------------------------------------
def timestamp(value: str | None) -> Timestamp | None:
    if not value:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(float(value) * 1e9))
    return ts


def hyperparameters_from_pb(hp: pb.Hyperparameters) -> dict:
    """Only the fields the client set (proto3 ``optional`` tracks presence)."""
    out = {}
    for name in OPTIONAL_HP:
        if hp.HasField(name):
            value = getattr(hp, name)
            # float32 on the wire: round so 1e-4 stays 1e-4, not 9.999999747378752e-05
            if name == "merge_lora":
                out[name] = bool(value)
            else:
                out[name] = float(f"{value:.7g}") if name in FLOAT_HP else int(value)
    if hp.lora_target_modules:
        out["lora_target_modules"] = list(hp.lora_target_modules)
    return out


def hyperparameters_to_pb(hp: dict) -> pb.Hyperparameters:
    kw = {k: v for k, v in hp.items() if k in OPTIONAL_HP}
    return pb.Hyperparameters(**kw, lora_target_modules=hp.get("lora_target_modules", []))


def job_to_pb(d: dict) -> pb.Job:
    job = pb.Job(
        id=d["id"], base_model=d.get("base_model", ""), dataset_id=d.get("dataset_id", ""),
        method=METHOD_VALUES.get(d.get("method", ""), pb.METHOD_UNSPECIFIED),
        status=STATUS_VALUES.get(d.get("status", ""), pb.JOB_STATUS_UNSPECIFIED),
        hyperparameters=hyperparameters_to_pb(json.loads(d.get("hyperparameters") or "{}")),
        suffix=d.get("suffix", ""), fine_tuned_model=d.get("fine_tuned_model", ""),
        trained_tokens=int(d.get("trained_tokens") or 0), step=int(d.get("step") or 0),
        total_steps=int(d.get("total_steps") or 0), attempt=int(d.get("attempt") or 0),
        worker=d.get("worker", ""), cancel_requested=d.get("cancel_requested") == "1",
        idempotency_key=d.get("idempotency_key", ""), tenant=d.get("tenant", ""),
    )
    for field in ("created_at", "started_at", "finished_at"):
        ts = timestamp(d.get(field))
        if ts is not None:
            getattr(job, field).CopyFrom(ts)
    if d.get("train_loss"):
        job.train_loss = float(d["train_loss"])
    if d.get("eval_loss"):
        job.eval_loss = float(d["eval_loss"])
    if d.get("error_code"):
        job.error.CopyFrom(pb.JobError(code=d["error_code"], message=d.get("error_message", "")))
    return job


def checkpoint_to_pb(c: dict) -> pb.Checkpoint:
    cp = pb.Checkpoint(step=int(c["step"]), path=c.get("path", ""), trained_tokens=int(c.get("trained_tokens", 0)))
    if c.get("train_loss") is not None:
        cp.train_loss = c["train_loss"]
    if c.get("eval_loss") is not None:
        cp.eval_loss = c["eval_loss"]
    ts = timestamp(str(c.get("created_at", "")))
    if ts is not None:
        cp.created_at.CopyFrom(ts)
    return cp


def event_to_pb(job_id: str, event_id: str, f: dict) -> pb.JobEvent:
    data = json.loads(f.get("data") or "{}")
    ev = pb.JobEvent(id=event_id, job_id=job_id, type=EVENT_VALUES.get(f.get("type", ""), 0),
                     message=f.get("message", ""))
    ts = timestamp(f.get("time"))
    if ts is not None:
        ev.created_at.CopyFrom(ts)
    if f.get("status"):
        ev.status = STATUS_VALUES.get(f["status"], 0)
    if f.get("type") == "METRICS":
        ev.metrics.CopyFrom(pb.Metrics(
            step=data["step"], total_steps=data["total_steps"], loss=data["loss"], learning_rate=data["lr"],
            tokens_per_second=data["tokens_per_s"], trained_tokens=data["trained_tokens"], epoch=data["epoch"]))
    elif f.get("type") == "EVAL":
        ev.eval_loss = data["eval_loss"]
    elif f.get("type") == "CHECKPOINT":
        ev.checkpoint.CopyFrom(checkpoint_to_pb(data))
    if data.get("fine_tuned_model"):
        ev.fine_tuned_model = data["fine_tuned_model"]
    if data.get("error"):
        ev.error.CopyFrom(pb.JobError(**data["error"]))
    return ev


# --- the handler -------------------------------------------------------------------------------------
class FineTuneHandler:
    def __init__(self, settings: FineTuneSettings):
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.bases = BaseModels(settings.models, settings.model_store, settings.default_model)
        self.r = None
        self.r_watch = None  # a pool of its own for WatchJob's blocking reads: watches never starve other RPCs
        self.scripts: dict = {}
        self._watches = 0

    async def connect(self) -> None:
        self.r = redis_client(self.settings.redis_url, asyncio=True, password=self.settings.redis_password())
        self.r_watch = redis_client(self.settings.redis_url, asyncio=True, password=self.settings.redis_password(),
                                    max_connections=self.settings.max_watches)
        self.scripts = {name: self.r.register_script(src) for name, src in SCRIPTS.items()}
        try:
            await asyncio.to_thread(self._ensure_group_sync)
        except Exception as e:  # Redis down at start: serve anyway; RPCs answer UNAVAILABLE until it is back
            log.warning("Redis at %s not reachable yet (%s); RPCs return UNAVAILABLE until it is",
                        redacted(self.settings.redis_url), e)

    def _ensure_group_sync(self) -> None:
        r = redis_client(self.settings.redis_url, password=self.settings.redis_password())
        try:
            ensure_group(r, self.keys)
        finally:
            r.close()

    async def close(self) -> None:
        for r in (self.r, self.r_watch):
            if r is not None:
                await r.aclose()

    # --- datasets ---------------------------------------------------------------------------------
    async def upload_dataset(self, requests) -> pb.Dataset:
        """Validate a streamed JSONL file line by line, then store it; nothing is stored on error."""
        tenant = tenants.current()
        limit, max_line = self.settings.max_dataset_bytes, self.settings.max_line_bytes
        quota = tenant.quotas.dataset_bytes
        parts: list[bytes] = []
        pending: list[bytes] = []  # the pieces of the line not yet complete (linear: never re-split)
        pending_len = 0
        size = lineno = examples = tokens = 0
        filename = model = None
        tokenizer = block_size = None
        async for req in requests:
            if filename is None:
                filename, model = req.filename or "dataset.jsonl", req.model or self.bases.default
                tokenizer, block_size = await asyncio.to_thread(self.bases.info, model)
            size += len(req.data)
            if size > limit:
                raise InvalidArgument(f"dataset is larger than the server's limit of {limit} bytes")
            if quota and size > quota:  # cannot fit even alone: stop reading now
                raise exhausted(tenant, "dataset_bytes", quota, f"this upload alone is over {quota} bytes")
            parts.append(req.data)
            *lines, rest = req.data.split(b"\n")
            if lines:
                lines[0] = b"".join([*pending, lines[0]])
                pending, pending_len = [], 0
            if rest:
                pending.append(rest)
                pending_len += len(rest)
            longest = max(max(map(len, lines), default=0), pending_len)
            if longest > max_line:
                raise InvalidArgument(f"invalid dataset: a line after line {lineno} is longer than the limit of "
                                      f"{max_line} bytes (max_line_bytes)")
            if lines:
                n, t = await asyncio.to_thread(check_lines, lines, lineno, tokenizer, block_size)
                lineno, examples, tokens = lineno + len(lines), examples + n, tokens + t
        if filename is None:
            raise InvalidArgument("invalid dataset: the upload was empty (no data sent)")
        if pending:
            n, t = await asyncio.to_thread(check_lines, [b"".join(pending)], lineno, tokenizer, block_size)
            examples, tokens = examples + n, tokens + t
        if examples == 0:
            raise InvalidArgument("invalid dataset: the file is empty (no records)")
        ds_id = "ds-" + secrets.token_hex(6)
        created = now()
        meta = {"id": ds_id, "filename": filename[:255], "examples": examples, "tokens": tokens, "bytes": size,
                "model": model, "block_size": block_size, "created_at": created, "tenant": tenant.name}
        k = self.keys
        outcome, used = await self.scripts["store_dataset"](
            keys=[k.dataset_data(ds_id), k.dataset(ds_id), k.tenant_datasets(tenant.name)],
            args=[k.prefix, quota, size, b"".join(parts), *[x for kv in meta.items() for x in (kv[0], str(kv[1]))]])
        if outcome == "quota":
            raise exhausted(tenant, "dataset_bytes", quota, f"{used} bytes stored, this upload is {size}; "
                                                            "delete a dataset first")
        log.info("dataset %s: %d records, %d tokens (%s)", ds_id, examples, tokens, clip(filename))
        return dataset_to_pb(meta)

    async def _dataset(self, ds: str, hint: str = "") -> dict:
        """The dataset's metadata if the caller may see it; NOT_FOUND otherwise (another tenant's too)."""
        meta = await self.r.hgetall(self.keys.dataset(dataset_id(ds)))
        if not meta or not tenants.current().owns_record(meta.get("tenant", "")):
            raise NotFound(f"dataset {ds!r} not found{hint}")
        return meta

    async def get_dataset(self, req: pb.GetDatasetRequest) -> pb.Dataset:
        return dataset_to_pb(await self._dataset(req.id))

    # --- jobs -------------------------------------------------------------------------------------
    async def create_job(self, req: pb.CreateJobRequest) -> pb.Job:
        tenant = tenants.current()
        key = req.idempotency_key
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        if key:
            existing = await self.r.get(self.keys.idempotency(key, tenant.name))
            if existing:
                return await self._job(existing)
        base = req.base_model or self.bases.default
        await asyncio.to_thread(self.bases.path, base)  # NotFound with the list of bases
        meta = await self._dataset(req.dataset_id, "; upload it first (UploadDataset)")
        method = METHOD_NAMES.get(req.method)
        if method is None:
            raise InvalidArgument(f"unknown method {req.method}; use METHOD_FULL or METHOD_LORA")
        try:
            hp = resolve_hyperparameters(method, hyperparameters_from_pb(req.hyperparameters), int(meta["examples"]))
            suffix = check_suffix(req.suffix)
            check_model_name(base, suffix)
        except HyperparameterError as e:
            raise InvalidArgument(str(e)) from None
        tokenizer, block_size = await asyncio.to_thread(self.bases.info, base)
        if meta.get("model") != base or int(meta.get("block_size", 0)) > block_size:
            # Checked at upload under another model: check again under this base's tokenizer and context.
            text = await self.r.get(self.keys.dataset_data(req.dataset_id))
            try:
                await asyncio.to_thread(check_lines, text.encode().split(b"\n"), 0, tokenizer, block_size)
            except DatasetError as e:
                raise InvalidArgument(f"dataset {req.dataset_id} does not fit base model {base!r}: {e}") from None
        k = self.keys
        idem_key = k.idempotency(key or "-", tenant.name)
        quotas = tenant.quotas
        published = (await asyncio.to_thread(owned_store_models, self.settings.model_store, tenant.name)
                     if quotas.published_models else 0)
        for _ in range(5):  # a new id on the (2^-48) chance that this one is taken
            new_id = "ftjob-" + secrets.token_hex(6)
            created = time.time()
            fields = {
                "id": new_id, "base_model": base, "dataset_id": req.dataset_id, "method": method,
                "hyperparameters": json.dumps(hp), "suffix": suffix, "created_at": f"{created:.6f}",
                "total_steps": hp["total_steps"], "step": 0, "trained_tokens": 0, "attempt": 0,
                "idempotency_key": key, "tenant": tenant.name,
            }
            outcome, found, count = await self.scripts["create"](
                keys=[k.job(new_id), k.jobs, k.queue, k.events(new_id), idem_key, k.dataset_jobs(req.dataset_id),
                      k.prefix, k.tenant_jobs(tenant.name), k.tenant_active(tenant.name)],
                args=[new_id, int(created * 1e6), "1" if key else "0", now(), quotas.active_jobs,
                      quotas.published_models, published, *[x for kv in fields.items() for x in (kv[0], str(kv[1]))]])
            if outcome != "collision":
                break
        if outcome == "exists":
            return await self._job(found)
        if outcome == "quota":
            limit = getattr(quotas, found)
            why = (f"{count} jobs queued or running; wait for one to finish or cancel one" if found == "active_jobs"
                   else f"{count} models published or being trained; delete one (DeleteModel) first")
            raise exhausted(tenant, found, limit, why)
        log.info("job %s queued: %s %s on %s, %d steps", new_id, method, req.dataset_id, base, hp["total_steps"])
        return await self._job(new_id)

    async def _job_record(self, jid: str) -> dict:
        """The job's hash if the caller may see it; NOT_FOUND otherwise (another tenant's too)."""
        d = await self.r.hgetall(self.keys.job(job_id(jid)))
        if not d or not tenants.current().owns_record(d.get("tenant", "")):
            raise NotFound(f"job {jid!r} not found")
        return d

    async def _job(self, jid: str) -> pb.Job:
        return job_to_pb(await self._job_record(jid))

    async def get_job(self, req: pb.GetJobRequest) -> pb.Job:
        return await self._job(job_id(req.id))

    async def list_jobs(self, req: pb.ListJobsRequest) -> pb.ListJobsResponse:
        """Newest first; with statuses, read from the per-status indexes (no scan of other jobs)."""
        size = req.page_size or 20
        if not 1 <= size <= 1000:
            raise InvalidArgument(f"page_size must be in [1, 1000], got {req.page_size}")
        unknown = [s for s in req.statuses if s not in STATUS_VALUES.values()]
        if unknown:
            raise InvalidArgument(f"unknown job status value(s) {unknown[:5]}")
        wanted = sorted({name for name, v in STATUS_VALUES.items() if v in set(req.statuses)})
        if req.page_token:
            upper = f"({check_id(req.page_token, PAGE_TOKEN, 'page_token', 'a next_page_token this server returned')}"
        else:
            upper = "+inf"
        k = self.keys
        tenant = tenants.current()  # a member without a status filter reads its own index
        indexes = [k.status_index(s) for s in wanted] or [k.jobs if tenant.is_admin else k.tenant_jobs(tenant.name)]
        page: list[tuple[dict, int]] = []
        while len(page) <= size:
            need = size + 1 - len(page)
            merged = []
            for index in indexes:
                merged += await self.r.zrevrangebyscore(index, upper, "-inf", start=0, num=need, withscores=True)
            if not merged:
                break
            merged = sorted(merged, key=lambda x: -x[1])[:need]
            pipe = self.r.pipeline(transaction=False)
            for jid, _ in merged:
                pipe.hgetall(k.job(jid))
            expired = []
            for (jid, score), d in zip(merged, await pipe.execute()):
                if not d:  # its records expired (finished_job_ttl_s): drop it from the indexes
                    expired.append(jid)
                elif tenant.owns_record(d.get("tenant", "")):
                    page.append((d, int(score)))
            if expired:
                pipe = self.r.pipeline(transaction=False)
                for index in (k.jobs, *(k.status_index(s) for s in STATUSES), *indexes):
                    pipe.zrem(index, *expired)
                await pipe.execute()
            upper = f"({int(merged[-1][1])}"
        resp = pb.ListJobsResponse(jobs=[job_to_pb(d) for d, _ in page[:size]])
        if len(page) > size:
            resp.next_page_token = str(page[size - 1][1])
        return resp

    async def cancel_job(self, req: pb.CancelJobRequest) -> pb.Job:
        await self._job_record(req.id)
        k = self.keys
        outcome, status = await self.scripts["cancel"](keys=[k.job(job_id(req.id)), k.events(req.id), k.prefix],
                                                       args=[now()])
        if outcome == "missing":
            raise NotFound(f"job {req.id!r} not found")
        if outcome == "terminal" and status != "CANCELLED":
            raise FailedPrecondition(f"job {req.id} already {status.lower()}; only queued or running jobs can be "
                                     "cancelled")
        return await self._job(req.id)

    async def list_checkpoints(self, req: pb.ListCheckpointsRequest) -> pb.ListCheckpointsResponse:
        await self._job_record(req.job_id)
        entries = [json.loads(e) for e in await self.r.lrange(self.keys.checkpoints(req.job_id), 0, -1)]
        # Older checkpoints are rotated away by the worker: list those still on disk.
        entries = [e for e in entries if Path(e["path"]).is_dir()]
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_to_pb(e) for e in entries])

    async def watch_job(self, req: pb.WatchJobRequest):
        """Replay the job's events after ``after_event_id``, then follow it until a terminal status.

        At most ``max_watches`` watches are open at once (RESOURCE_EXHAUSTED past that), each for at
        most ``watch_max_s``: then the stream ends and the client resumes with the last event's id
        (``FineTuneClient.watch_job`` does). Blocking reads use a pool of their own."""
        jid = job_id(req.id)
        last = check_id(req.after_event_id, EVENT_ID, "after_event_id", "a JobEvent.id") if req.after_event_id else "0-0"
        if self._watches >= self.settings.max_watches:
            raise ResourceExhausted(f"too many watches: {self._watches} open, at most {self.settings.max_watches}; "
                                    "retry shortly")
        self._watches += 1
        try:
            await self._job_record(jid)
            stream = self.keys.events(jid)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.watch_max_s
            while (left := deadline - loop.time()) > 0:
                got = await self.r_watch.xread({stream: last}, count=100, block=max(1, int(min(2.0, left) * 1000)))
                for _, entries in got or []:
                    for event_id, fields in entries:
                        last = event_id
                        yield event_to_pb(jid, event_id, fields)
                        if fields.get("type") == "STATUS" and fields.get("status") in TERMINAL:
                            return
                if not got:  # quiet: the job may have ended before the events we were shown
                    status = await self.r.hget(self.keys.job(jid), "status")
                    if status in TERMINAL and not await self.r.xread({stream: last}, count=1):
                        return
        finally:
            self._watches -= 1

    async def delete_dataset(self, req: pb.DeleteDatasetRequest) -> pb.DeleteDatasetResponse:
        """Delete a dataset's records and bytes; FAILED_PRECONDITION while a job on it is unfinished."""
        ds = dataset_id(req.id)
        await self._dataset(ds)  # another tenant's: NOT_FOUND
        k = self.keys
        outcome, detail = await self.scripts["delete_dataset"](
            keys=[k.dataset(ds), k.dataset_data(ds), k.dataset_jobs(ds), k.prefix])
        if outcome == "missing":
            raise NotFound(f"dataset {ds!r} not found")
        if outcome == "busy":
            raise FailedPrecondition(f"dataset {ds} is used by job {detail}, which has not finished; cancel it or "
                                     "wait for it first")
        log.info("dataset %s deleted", ds)
        return pb.DeleteDatasetResponse(id=ds)


def dataset_to_pb(meta: dict) -> pb.Dataset:
    ds = pb.Dataset(id=meta["id"], filename=meta["filename"], examples=int(meta["examples"]),
                    tokens=int(meta["tokens"]), bytes=int(meta["bytes"]), model=meta["model"],
                    tenant=meta.get("tenant", ""))
    ts = timestamp(str(meta["created_at"]))
    if ts is not None:
        ds.created_at.CopyFrom(ts)
    return ds


def check_lines(lines: list[bytes], first_lineno: int, tokenizer, block_size: int) -> tuple[int, int]:
    """Validate JSONL lines (numbered from ``first_lineno + 1``): (records, tokens). Raises DatasetError.

    The rules are lmcore's (``parse_record``, ``check_record``): what passes here is what a worker's
    ``RecordDataset`` accepts, with the same messages.
    """
    examples = tokens = 0
    for i, line in enumerate(lines, start=first_lineno + 1):
        record = parse_record(line, i)
        if record is None:
            continue
        ids, _ = check_record(tokenizer, record, block_size, i)
        examples += 1
        tokens += len(ids)
    return examples, tokens
