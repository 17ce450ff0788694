"""``python -m services.finetune.worker``: claim fine-tuning jobs from Redis and train them.

The life of a job on a worker (the Redis side of each step is in ``store.py``)::

    next_message   XAUTOCLAIM a job whose worker went silent, else XREADGROUP a new one
    start          QUEUED/orphaned RUNNING -> RUNNING (attempt + 1); skip cancelled or stale entries
    train          load the base, tokenize the dataset, apply LoRA, resume from the latest
                   checkpoint if any, run lmcore's Trainer; a heartbeat thread renews the lease
                   and every optimizer step first checks for cancellation or a lost lease
    publish        write the model (or adapter) to <store>/.tmp-..., rename it to
                   <store>/ft:<base>:<suffix>:<id>, then finish SUCCEEDED (fenced)

The published directory's ``finetune.json`` names the job's ``tenant``: the model belongs to it
(``services.models`` reads the owner, the inference service scopes ListModels and requests by it).

Crash safety: checkpoints are atomic (``lmcore.training.trainer``) and live in the shared model store
(``<store>/.checkpoints/<job id>``), so whichever worker takes over resumes the same trajectory
and, training being deterministic for a seed, ends with the same weights. SIGTERM/SIGINT stop the
job after the current step, checkpoint it and hand it back to the queue (status QUEUED), so a
deploy never costs more than one step of work. Redis outages are ridden out: status changes are
retried until they land; progress events during an outage are dropped (the job record catches up
at the next step).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import redis

from lmcore.training import DatasetError, RecordDataset, TrainEvent
from lmcore.training.data import read_records, train_eval_split
from lmcore.training.trainer import latest_checkpoint, list_checkpoints

from .bases import BaseModels
from .metrics import WorkerMetrics
from .settings import WorkerSettings
from .spec import lora_config, model_name, train_config
from .store import JobStore, Keys, redacted, redis_client

log = logging.getLogger("lmstack.finetune.worker")


class JobFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Worker:
    def __init__(self, settings: WorkerSettings):
        if not settings.model_store:
            raise SystemExit("lmstack worker: --model-store (LMSTACK_MODEL_STORE) is required: results and "
                             "checkpoints go there")
        self.settings = settings
        self.id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.store = JobStore(redis_client(settings.redis_url, password=settings.redis_password()), Keys(settings.redis_prefix),
                              settings.max_events_per_job)
        self.bases = BaseModels(settings.models, settings.model_store, settings.default_model)
        self.store_dir = Path(settings.model_store)
        self.shutdown = threading.Event()
        self.metrics = WorkerMetrics()
        self.heartbeat_s = settings.heartbeat_s or settings.reclaim_idle_s / 4

    def run(self) -> None:
        """Claim and run jobs until ``shutdown`` is set."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        while not self.shutdown.is_set():
            try:
                self.store.ensure_group()
                break
            except redis.RedisError as e:
                log.warning("waiting for Redis at %s: %s", redacted(self.settings.redis_url), e)
                self.shutdown.wait(1.0)
        log.info("worker %s ready (reclaim after %.1fs idle, heartbeat every %.2fs)", self.id,
                 self.settings.reclaim_idle_s, self.heartbeat_s)
        next_prune = 0.0
        while not self.shutdown.is_set():
            try:
                self.store.worker_seen(self.id)
                if time.monotonic() > next_prune:  # every worker ever started left a consumer name behind
                    self.store.prune_consumers()
                    self.store.trim_queue()
                    next_prune = time.monotonic() + 600
                got = self.store.next_message(self.id, int(self.settings.reclaim_idle_s * 1000),
                                              int(self.settings.poll_s * 1000))
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):  # Redis lost the group (a restart without persistence): recreate
                    self._retry(self.store.ensure_group)
                    continue
                raise
            except redis.RedisError as e:
                log.warning("Redis error while waiting for jobs (%s); retrying", e)
                self.shutdown.wait(0.5)
                continue
            if got is not None:
                self.handle(*got)

    def handle(self, msg_id: str, job_id: str) -> None:
        outcome, detail, *was = self._retry(lambda: self.store.start(job_id, self.id, msg_id))
        if outcome == "run":
            if was == ["RUNNING"]:  # its worker went silent mid-run: we take it over
                self.metrics.reclaimed.inc()
            JobRun(self, job_id, msg_id, int(detail)).execute()
        else:
            log.info("skipping queue entry %s for job %s (%s)", msg_id, job_id, detail)
        try:
            self.store.trim_queue()  # acknowledged entries never pile up
        except redis.RedisError as e:
            log.warning("queue trim skipped (%s)", e)

    def _retry(self, fn, what: str = "Redis call"):
        """Run ``fn`` until Redis answers (status changes must not be lost to an outage)."""
        delay = 0.1
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


class JobRun:
    """One attempt at one job on this worker."""

    def __init__(self, worker: Worker, job_id: str, msg_id: str, attempt: int):
        self.w, self.store = worker, worker.store
        self.job_id, self.msg_id, self.attempt = job_id, msg_id, attempt
        self.cancelled = self.lost = False
        self._hb_stop = threading.Event()
        self.started_at = time.time()  # the job's first start once its record is read

    # --- control ------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._hb_stop.wait(self.w.heartbeat_s):
            try:
                outcome, _ = self.store.heartbeat(self.job_id, self.w.id, self.attempt, self.msg_id)
            except redis.RedisError as e:
                log.warning("heartbeat for %s failed: %s", self.job_id, e)
                self.w.metrics.heartbeats.labels("error").inc()
                continue
            self.w.metrics.heartbeats.labels(outcome).inc()
            try:
                self.store.worker_seen(self.w.id)  # the main loop is busy training: say we are alive
            except redis.RedisError:
                pass
            if outcome == "lost":
                log.warning("job %s was taken over by another worker; abandoning it", self.job_id)
                self.lost = True
                return

    def should_stop(self) -> bool:
        """Polled before every optimizer step: shutdown, cancellation, or a lost lease."""
        if self.w.shutdown.is_set() or self.lost:
            return True
        try:
            cancel, ours = self.store.control(self.job_id, self.w.id, self.attempt)
        except redis.RedisError:
            return False  # keep training through a Redis blip; the heartbeat guards the lease
        self.cancelled, self.lost = cancel, not ours
        return cancel or not ours

    def _event(self, type_: str, message: str = "", data: dict | None = None, fields: dict | None = None) -> None:
        try:
            self.store.event(self.job_id, type_, message, data, fields)
        except redis.RedisError as e:
            log.warning("event for %s dropped (%s)", self.job_id, e)

    def on_train_event(self, e: TrainEvent) -> None:
        if e.kind == "step":
            self.w.metrics.steps.inc(e.step - self._last_step)
            self.w.metrics.tokens.inc(e.trained_tokens - self._last_tokens)
            self._last_step, self._last_tokens = e.step, e.trained_tokens
            self._event("METRICS", f"step {e.step}/{e.total_steps}: loss {e.loss:.4f}",
                        {"step": e.step, "total_steps": e.total_steps, "loss": e.loss, "lr": e.lr,
                         "tokens_per_s": e.tokens_per_s, "trained_tokens": e.trained_tokens, "epoch": e.epoch},
                        {"step": e.step, "total_steps": e.total_steps, "trained_tokens": e.trained_tokens,
                         "train_loss": e.loss, "learning_rate": e.lr, "tokens_per_s": e.tokens_per_s})
        elif e.kind == "eval":
            self._event("EVAL", f"step {e.step}: held-out loss {e.eval_loss:.4f}",
                        {"step": e.step, "eval_loss": e.eval_loss}, {"eval_loss": e.eval_loss})
        elif e.kind == "checkpoint":
            self._checkpoint_saved(e.step, e.path)

    def _checkpoint_saved(self, step: int, path: str) -> None:
        t = self.trainer
        entry = {"step": step, "path": path, "train_loss": t.last_loss, "eval_loss": t.last_eval_loss,
                 "trained_tokens": t.trained_tokens, "created_at": time.time()}
        try:
            self.store.add_checkpoint(self.job_id, entry)
        except redis.RedisError as e:
            log.warning("checkpoint record for %s dropped (%s)", self.job_id, e)
        self._event("CHECKPOINT", f"checkpoint saved at step {step}", entry)

    # --- the job ------------------------------------------------------------------------------
    def execute(self) -> None:
        w = self.w
        w.metrics.busy.set(1)
        hb = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.job_id}", daemon=True)
        hb.start()
        try:
            self._train_and_publish()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Not the job's fault: leave it pending; once Redis is back and the lease has expired,
            # a worker (this one included) reclaims it and resumes from its latest checkpoint.
            log.warning("job %s: Redis unreachable (%s); it will be reclaimed and resumed", self.job_id, e)
        except JobFailure as e:
            self._finish("FAILED", f"failed: {e}", error=(e.code, str(e)))
        except DatasetError as e:
            self._finish("FAILED", f"failed: {e}", error=("invalid_dataset", f"invalid dataset: {e}"))
        except Exception as e:  # a bug or a resource problem: fail the job, keep the worker alive
            log.exception("job %s failed", self.job_id)
            self._finish("FAILED", f"failed: {type(e).__name__}: {e}",
                         error=("training_error", f"{type(e).__name__}: {e}"))
        finally:
            self._hb_stop.set()
            hb.join()
            w.metrics.busy.set(0)

    def _finish(self, status: str, message: str, error: tuple[str, str] | None = None,
                fields: dict | None = None, data: dict | None = None) -> bool:
        fields = dict(fields or {})
        data = dict(data or {})
        if error is not None:
            fields |= {"error_code": error[0], "error_message": error[1]}
            data["error"] = {"code": error[0], "message": error[1]}
        ok = self.w._retry(lambda: self.store.finish(self.job_id, self.w.id, self.attempt, self.msg_id, status,
                                                     message, data, fields), "finishing a job")
        self.w.metrics.job_ended(status.lower() if ok else "lost", self.started_at)
        if ok:
            log.info("job %s %s", self.job_id, message)
            self._retain()
        else:
            log.warning("job %s: not ours any more; result %s discarded", self.job_id, status)
        return ok

    def _retain(self) -> None:
        """A finished job keeps its result, its newest ``checkpoints_kept_after_finish`` checkpoints
        and its records for ``finished_job_ttl_s``; the rest goes now."""
        settings = self.w.settings
        ckpt_dir = self.w.store_dir / ".checkpoints" / self.job_id
        keep = settings.checkpoints_kept_after_finish
        found = list_checkpoints(ckpt_dir)
        for old in found[: len(found) - keep] if keep else found:
            shutil.rmtree(old, ignore_errors=True)
        if not keep:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        try:
            self.store.retain(self.job_id, settings.finished_job_ttl_s)
        except redis.RedisError as e:
            log.warning("retention of %s not set (%s)", self.job_id, e)

    def _train_and_publish(self) -> None:
        import torch

        from lmcore.lora import apply_lora
        from lmcore.model import load_model

        job = self.store.job(self.job_id)
        self.started_at = float(job.get("started_at") or self.started_at)
        hp = json.loads(job["hyperparameters"])
        text = self.store.dataset_text(job["dataset_id"])
        if text is None:
            raise JobFailure("invalid_dataset", f"dataset {job['dataset_id']} no longer exists")
        try:
            base_path = self.w.bases.path(job["base_model"])
        except Exception as e:
            raise JobFailure("invalid_base_model", str(e)) from None
        model = load_model(base_path, dtype=torch.float32)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise JobFailure("invalid_base_model", f"base model {job['base_model']!r} has no tokenizer")
        dataset = RecordDataset.from_records(read_records(text.split("\n")), tokenizer, model.config.block_size)
        train_set, eval_set = train_eval_split(dataset, hp["eval_fraction"], hp["seed"])
        torch.manual_seed(hp["seed"])  # the adapter's initialisation is part of the seeded run
        lora = job["method"] == "LORA"
        if lora:
            apply_lora(model, lora_config(hp))
        from lmcore.training import Trainer

        ckpt_dir = self.w.store_dir / ".checkpoints" / self.job_id
        self.trainer = Trainer(model, train_config(hp, self.w.settings.keep_checkpoints), train_set, eval_set,
                               checkpoint_dir=ckpt_dir, callback=self.on_train_event, should_stop=self.should_stop)
        latest = latest_checkpoint(ckpt_dir)
        if latest is not None:
            self.trainer.load_checkpoint(latest)
            self._event("INFO", f"resumed from the checkpoint at step {self.trainer.step}",
                        {"step": self.trainer.step, "path": str(latest)})
        self._last_step, self._last_tokens = self.trainer.step, self.trainer.trained_tokens
        result = self.trainer.train(resume=False)
        if result.stopped:
            self._stopped(result)
            return
        name = model_name(job["base_model"], job["suffix"], self.job_id)
        if not self._publish(model, tokenizer, name, job, hp, result, lora):
            return
        self._finish("SUCCEEDED", f"succeeded: {name}",
                     fields={"fine_tuned_model": name, "trained_tokens": result.trained_tokens, "step": result.steps,
                             "train_loss": result.train_loss if result.train_loss is not None else "",
                             "eval_loss": result.eval_loss if result.eval_loss is not None else ""},
                     data={"fine_tuned_model": name})

    def _stopped(self, result) -> None:
        if self.cancelled:
            self._finish("CANCELLED", f"cancelled at step {result.steps}/{result.total_steps}",
                         fields={"step": result.steps, "trained_tokens": result.trained_tokens})
        elif self.lost:
            self.w.metrics.job_ended("lost", self.started_at)
        else:  # shutting down: save where we are and give the job back to the queue
            path = self.trainer.save_checkpoint()
            self._checkpoint_saved(self.trainer.step, str(path))
            ok = self.w._retry(lambda: self.store.requeue(
                self.job_id, self.w.id, self.attempt, self.msg_id,
                f"worker {self.w.id} shutting down; requeued at step {result.steps} (resumes there)"))
            self.w.metrics.job_ended("requeued" if ok else "lost", self.started_at)

    def _publish(self, model, tokenizer, name: str, job: dict, hp: dict, result, lora: bool) -> bool:
        """Write the result beside its final name, then rename it in (a reader never sees half a model)."""
        from lmcore.lora import save_adapter
        from lmcore.model import save_pretrained

        final = self.w.store_dir / name
        if final.exists():  # an earlier attempt published it and died before recording SUCCEEDED
            return self._published_by_us(final)
        tmp = self.w.store_dir / f".tmp-{self.job_id}-{self.w.id}"
        shutil.rmtree(tmp, ignore_errors=True)
        info = {"job_id": self.job_id, "base_model": job["base_model"], "method": job["method"],
                "dataset_id": job["dataset_id"], "hyperparameters": hp, "steps": result.steps,
                "train_loss": result.train_loss, "eval_loss": result.eval_loss,
                "trained_tokens": result.trained_tokens, "tenant": job.get("tenant", "")}
        if lora and not hp.get("merge_lora"):
            save_adapter(model, tmp, base_model=job["base_model"], extra={"job_id": self.job_id})
        else:
            if lora:
                from lmcore.lora import merge_lora

                merge_lora(model)  # W + (alpha/r) B A: a plain model again
            save_pretrained(model, tmp, tokenizer=tokenizer)
        (tmp / "finetune.json").write_text(json.dumps(info, indent=2) + "\n")
        if self.should_stop() and (self.lost or self.cancelled):
            shutil.rmtree(tmp, ignore_errors=True)
            if self.cancelled:
                self._finish("CANCELLED", f"cancelled at step {result.steps} (before publishing)")
            return False
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():  # not a lost race: the rename itself failed (name, disk, permissions)
                raise
            return self._published_by_us(final)  # another attempt of this job won the rename
        return True

    def _published_by_us(self, final: Path) -> bool:
        """A result already at ``final`` is this job's (an earlier attempt's: same run, same weights);
        anything else there is a failure of this job, never a success reported for another's model."""
        try:
            owner = json.loads((final / "finetune.json").read_text()).get("job_id")
        except (OSError, ValueError):
            owner = None
        if owner != self.job_id:
            raise JobFailure("internal", f"{final.name} already exists in the model store and is not this job's")
        return True


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings.from_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(settings.torch_threads)
    worker = Worker(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.shutdown.set())
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, settings.host, registry=worker.metrics.registry)
    worker.run()
    log.info("worker %s stopped", worker.id)


if __name__ == "__main__":
    main()
