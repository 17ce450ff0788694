"""A Python client for the fine-tuning service (the CLI, the tests and the benchmark use it).

    from services.finetune.client import FineTuneClient

    with FineTuneClient("127.0.0.1:50053") as ft:
        ds = ft.upload_dataset("train.jsonl")                       # streamed in 1 MiB chunks
        job = ft.create_job("pycode", ds.id, method="LORA", max_steps=200, learning_rate=1e-3,
                            suffix="mine", idempotency_key="run-1")
        for event in ft.watch_job(job.id):                         # until SUCCEEDED/FAILED/CANCELLED
            print(event.message)
        print(ft.get_job(job.id).fine_tuned_model)                 # ft:pycode:mine:1a2b3c4d

Errors raise ``grpc.RpcError`` with ``.code()`` and ``.details()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from services.client import Client
from services.gen.lmstack.v1 import finetune_pb2 as pb
from services.gen.lmstack.v1 import finetune_pb2_grpc

CHUNK_BYTES = 1 << 20
TERMINAL = (pb.JOB_STATUS_SUCCEEDED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED)
HP_FIELDS = set(pb.Hyperparameters.DESCRIPTOR.fields_by_name)


TERMINAL_STATUSES = (pb.JOB_STATUS_SUCCEEDED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED)


def status_name(status: int) -> str:
    """``JOB_STATUS_SUCCEEDED`` -> ``succeeded``."""
    return pb.JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()


def parse_status(name: str) -> int:
    try:
        return pb.JobStatus.Value("JOB_STATUS_" + name.upper())
    except ValueError:
        raise ValueError(f"unknown status {name!r}; use queued, running, succeeded, failed or cancelled") from None


def hyperparameters(**kw) -> pb.Hyperparameters:
    """``Hyperparameters`` from keyword arguments; ``None`` values stay unset (server defaults)."""
    unknown = set(kw) - HP_FIELDS
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(HP_FIELDS)}")
    kw = {k: v for k, v in kw.items() if v is not None}
    if isinstance(kw.get("lora_target_modules"), str):
        kw["lora_target_modules"] = kw["lora_target_modules"].split(",")
    return pb.Hyperparameters(**kw)


class FineTuneClient(Client):
    """``services.client.Client`` (channel, API key, timeouts, health, ``wait_ready``) plus the
    fine-tuning stub; one channel reaches every service a server hosts."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float = 60.0,
                 application: str | None = None, **tls_and_tenant):
        super().__init__(target, api_key=api_key, timeout=timeout, application=application, **tls_and_tenant)
        self.stub = finetune_pb2_grpc.FineTuningServiceStub(self.channel)

    # --- datasets ------------------------------------------------------------------------------
    def upload_dataset(self, source: str | Path | bytes, filename: str | None = None, model: str = "",
                       chunk_bytes: int = CHUNK_BYTES, timeout=None) -> pb.Dataset:
        """Upload a JSONL file (a path, or the bytes themselves) in chunks."""
        if isinstance(source, bytes):
            data, filename = source, filename or "dataset.jsonl"
        else:
            data, filename = Path(source).read_bytes(), filename or Path(source).name

        def chunks():
            yield pb.UploadDatasetRequest(filename=filename, model=model, data=data[:chunk_bytes])
            for i in range(chunk_bytes, len(data), chunk_bytes):
                yield pb.UploadDatasetRequest(data=data[i:i + chunk_bytes])

        return self.stub.UploadDataset(chunks(), **self._kw(timeout))

    def get_dataset(self, dataset_id: str, timeout=None) -> pb.Dataset:
        return self.stub.GetDataset(pb.GetDatasetRequest(id=dataset_id), **self._kw(timeout))

    # --- jobs ----------------------------------------------------------------------------------
    def create_job(self, base_model: str, dataset_id: str, method: str = "LORA", suffix: str = "",
                   idempotency_key: str = "", timeout=None, **hp) -> pb.Job:
        """Queue a job; hyperparameters are keyword arguments named like the proto's fields."""
        try:
            method_value = pb.Method.Value("METHOD_" + method.upper())
        except ValueError:
            raise ValueError(f"unknown method {method!r}; use FULL or LORA") from None
        req = pb.CreateJobRequest(base_model=base_model, dataset_id=dataset_id, method=method_value,
                                  hyperparameters=hyperparameters(**hp), suffix=suffix,
                                  idempotency_key=idempotency_key)
        return self.stub.CreateJob(req, **self._kw(timeout))

    def get_job(self, job_id: str, timeout=None) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(id=job_id), **self._kw(timeout))

    def list_jobs(self, statuses: list[str] = (), page_size: int = 20, page_token: str = "",
                  timeout=None) -> pb.ListJobsResponse:
        req = pb.ListJobsRequest(statuses=[parse_status(s) for s in statuses], page_size=page_size,
                                 page_token=page_token)
        return self.stub.ListJobs(req, **self._kw(timeout))

    def cancel_job(self, job_id: str, timeout=None) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(id=job_id), **self._kw(timeout))

    def list_checkpoints(self, job_id: str, timeout=None) -> list[pb.Checkpoint]:
        return list(self.stub.ListCheckpoints(pb.ListCheckpointsRequest(job_id=job_id),
                                              **self._kw(timeout)).checkpoints)

    def watch_job(self, job_id: str, after_event_id: str = "", timeout: float | None = 3600.0
                  ) -> Iterator[pb.JobEvent]:
        """The job's events, history first; ends after the terminal status event. The server ends
        a watch after its watch_max_s: this resumes it from the last event seen, within ``timeout``."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            ended = False
            for event in self.stub.WatchJob(pb.WatchJobRequest(id=job_id, after_event_id=after_event_id),
                                            timeout=left, metadata=self.metadata):
                after_event_id = event.id
                ended = event.type == pb.JOB_EVENT_TYPE_STATUS and event.status in TERMINAL_STATUSES
                yield event
            if ended or self.get_job(job_id, timeout=left).status in TERMINAL_STATUSES:
                if not ended:  # it ended between two watches: hand over what was left unseen
                    yield from self.stub.WatchJob(pb.WatchJobRequest(id=job_id, after_event_id=after_event_id),
                                                  timeout=left, metadata=self.metadata)
                return

    def delete_dataset(self, dataset_id: str, timeout=None) -> pb.DeleteDatasetResponse:
        return self.stub.DeleteDataset(pb.DeleteDatasetRequest(id=dataset_id), **self._kw(timeout))

    def wait(self, job_id: str, timeout: float = 600.0) -> pb.Job:
        """Block until the job is SUCCEEDED, FAILED or CANCELLED; returns its final record."""
        for _ in self.watch_job(job_id, timeout=timeout):
            pass
        return self.get_job(job_id)
