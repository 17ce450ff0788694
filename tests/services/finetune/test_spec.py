"""services.finetune.spec and the store's queue primitives, below the transport (no processes)."""

from __future__ import annotations

import pytest
import redis

from services.finetune.spec import (
    HyperparameterError,
    check_suffix,
    lora_config,
    model_name,
    resolve_hyperparameters,
    train_config,
)
from services.finetune.store import GROUP, JobStore, Keys, redis_client


def test_defaults_depend_on_method_and_dataset_size():
    lora = resolve_hyperparameters("LORA", {}, n_examples=100)
    assert lora["learning_rate"] == 1e-3 and lora["lora_rank"] == 8 and lora["lora_alpha"] == 16.0
    assert lora["eval_fraction"] == 0.1 and lora["epochs"] == 3
    assert lora["total_steps"] == 3 * 12  # 90 training records / batch 8 -> 12 batches per epoch
    assert lora["checkpoint_interval"] == 3 and lora["eval_interval"] == 9 and lora["warmup_steps"] == 2
    full = resolve_hyperparameters("FULL", {"max_steps": 7, "epochs": 2}, n_examples=5)
    assert full["total_steps"] == 7 and "epochs" not in full and "lora_rank" not in full
    assert full["learning_rate"] == 1e-4 and full["eval_fraction"] == 0.0
    cfg = train_config(full)
    assert cfg.max_steps == 7 and cfg.seed == 0
    assert lora_config(lora).target_modules == ("attn.c_attn", "attn.c_proj")


@pytest.mark.parametrize("method, given, field", [
    ("LORA", {"learning_rate": 2.0}, "hyperparameters.learning_rate"),
    ("LORA", {"lora_dropout": 1.5}, "hyperparameters.lora_dropout"),
    ("LORA", {"max_steps": 0}, "hyperparameters.max_steps"),
    ("LORA", {"epochs": 0}, "hyperparameters.epochs"),
    ("FULL", {"lora_alpha": 4.0}, "hyperparameters.lora_alpha"),
    ("LORA", {"grad_clip": -1.0}, "hyperparameters.grad_clip"),
    ("LORA", {"batch_size": 0}, "hyperparameters.batch_size"),
    ("FULL", {"grad_accum_steps": 0}, "hyperparameters.grad_accum_steps"),
    ("SOMETHING", {}, "method"),
])
def test_bad_hyperparameters_are_named(method, given, field):
    with pytest.raises(HyperparameterError, match=field):
        resolve_hyperparameters(method, given, n_examples=20)


def test_total_steps_is_the_trainers_rule():
    """The job record's total_steps is TrainConfig.total_steps of the training split (one owner)."""
    from lmcore.training import TrainConfig

    hp = resolve_hyperparameters("LORA", {"epochs": 2, "batch_size": 3, "grad_accum_steps": 2}, n_examples=50)
    assert hp["total_steps"] == TrainConfig(epochs=2, batch_size=3, grad_accum_steps=2).total_steps(45) == 15
    assert train_config(hp).total_steps(45) == 15  # what the worker's Trainer will run


def test_names():
    assert check_suffix("") == "custom" and check_suffix("sql-v2") == "sql-v2"
    with pytest.raises(ValueError, match="suffix"):
        check_suffix("Has Space")
    assert model_name("pycode", "sql", "ftjob-0123456789ab") == "ft:pycode:sql:0123456789ab"


def test_dead_consumers_are_pruned_and_silent_jobs_reclaimed(redis_server):
    store = JobStore(redis_client(redis_server.url), Keys("t"))
    store.ensure_group()
    store.ensure_group()  # idempotent
    store.r.xadd(store.keys.queue, {"job_id": "ftjob-a"})
    msg, job = store.next_message("dead-worker", reclaim_idle_ms=60_000, block_ms=10)
    assert job == "ftjob-a"
    # Not idle long enough: nobody else may take it yet.
    assert store.next_message("other", reclaim_idle_ms=60_000, block_ms=10) is None
    # Idle past the timeout: the next worker reclaims the very same entry.
    assert store.next_message("other", reclaim_idle_ms=0, block_ms=10) == (msg, "ftjob-a")
    assert store.prune_consumers(idle_ms=-1) == ["dead-worker"]  # nothing pending any more
    names = {c["name"] for c in store.r.xinfo_consumers(store.keys.queue, GROUP)}
    assert names == {"other"}
    with pytest.raises(redis.ResponseError):
        store.r.xgroup_create(store.keys.queue, GROUP, id="0")
