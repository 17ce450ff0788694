"""Settings of the fine-tuning API and its workers (flags or ``LMSTACK_*`` environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.config import ModelServiceSettings


class FineTuneSettings(ModelServiceSettings):
    """``python -m services.finetune``: ``--models`` are the base models jobs may fine-tune (by name);
    ``--model-store`` is where results and checkpoints go (shared with the workers and the
    inference service)."""

    port: int = Field(50053, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the queue, jobs and events")
    redis_password_file: str = Field("", description="file holding Redis's password (requirepass), so it "
                                                     "stays out of URLs, environments and logs")
    redis_prefix: str = Field("lmstack:ft", description="prefix of every Redis key (several stacks, one Redis)")
    max_dataset_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest accepted dataset file")
    max_line_bytes: int = Field(4 * 1024 * 1024, gt=0, description="longest accepted dataset line (one record)")
    max_watches: int = Field(64, ge=1, description="WatchJob streams open at once (each holds a Redis "
                                                   "connection of their own pool); past it RESOURCE_EXHAUSTED")
    watch_max_s: float = Field(300.0, gt=0, description="a WatchJob stream ends after this long; the client "
                                                        "resumes with after_event_id")
    max_events_per_job: int = Field(1000, ge=10, description="events kept per job (older progress events are "
                                                             "trimmed)")
    finished_job_ttl_s: float = Field(30 * 86400.0, ge=0, description="a finished job's records expire after "
                                                                      "this long (0: never)")
    checkpoints_kept_after_finish: int = Field(0, ge=0, description="checkpoints a finished job keeps on disk "
                                                                    "(0: only its final weights, which are "
                                                                    "always kept)")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads (workers: the training loop's)")
    reclaim_idle_s: float = Field(30.0, gt=0, description="a job whose worker sent no heartbeat for this "
                                                          "long is taken over by another worker (the API "
                                                          "counts such a worker as not alive)")

    def redis_password(self) -> str | None:
        """The password from ``redis_password_file`` (None: the URL's own, if any)."""
        if not self.redis_password_file:
            return None
        try:
            return Path(self.redis_password_file).expanduser().read_text().strip()
        except OSError as e:
            raise ValueError(f"--redis-password-file {self.redis_password_file}: cannot read it ({e.strerror})") from None


class WorkerSettings(FineTuneSettings):
    """``python -m services.finetune.worker``: claims jobs from the queue and trains them."""

    worker_id: str = Field("", description="consumer name in the Redis group (default: host-pid-random)")
    heartbeat_s: float = Field(0.0, ge=0, description="heartbeat period (default: reclaim_idle_s / 4)")
    poll_s: float = Field(1.0, gt=0, description="how long one blocking queue read waits")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept per job (older ones are deleted)")
