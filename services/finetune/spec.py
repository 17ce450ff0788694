"""What a job trains with: hyperparameter defaults, validation, and the trainer/LoRA configs.

Kept free of protobuf and Redis: the API server resolves and checks a request's hyperparameters
with :func:`resolve_hyperparameters` (so a bad value is ``INVALID_ARGUMENT`` at ``CreateJob``, never a
failed job later), stores the resolved dict in the job record, and the worker rebuilds the same
configs from it with :func:`train_config` and :func:`lora_config`.
"""

from __future__ import annotations

import re

from lmcore.lora import LoRAConfig
from lmcore.training import TrainConfig
from lmcore.training.data import eval_count

METHODS = ("FULL", "LORA")
MAX_STEPS = 1_000_000
SUFFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class HyperparameterError(ValueError):
    """A bad hyperparameter; the message names it as ``hyperparameters.<field>``."""


def resolve_hyperparameters(method: str, given: dict, n_examples: int) -> dict:
    """Every hyperparameter the job will use: ``given`` (only fields the client set) + defaults.

    Defaults that depend on the run's length (warmup, evaluation, checkpoint and logging intervals)
    are computed from the number of optimizer steps, which needs the dataset's size.
    """
    if method not in METHODS:
        raise HyperparameterError(f"method must be one of {METHODS}, got {method!r}")
    hp = dict(given)
    lora = method == "LORA"
    hp.setdefault("learning_rate", 1e-3 if lora else 1e-4)
    hp.setdefault("batch_size", 8)
    hp.setdefault("grad_accum_steps", 1)
    hp.setdefault("seed", 0)
    hp.setdefault("weight_decay", 0.0)
    hp.setdefault("grad_clip", 1.0)
    hp.setdefault("eval_fraction", 0.1 if n_examples >= 10 else 0.0)
    if not 0.0 <= hp["eval_fraction"] <= 0.5:
        raise HyperparameterError(f"hyperparameters.eval_fraction must be in [0, 0.5], got {hp['eval_fraction']}")
    n_train = n_examples - eval_count(n_examples, hp["eval_fraction"])
    if "max_steps" in hp:
        if not isinstance(hp["max_steps"], int) or not 0 < hp["max_steps"] <= MAX_STEPS:
            raise HyperparameterError(f"hyperparameters.max_steps must be in [1, {MAX_STEPS}], got {hp['max_steps']}")
        hp.pop("epochs", None)
    else:
        hp.setdefault("epochs", 3)
        if not isinstance(hp["epochs"], int) or not 0 < hp["epochs"] <= 1000:
            raise HyperparameterError(f"hyperparameters.epochs must be in [1, 1000], got {hp['epochs']}")
    # The step count is the trainer's rule (TrainConfig.total_steps), so the job record's
    # total_steps is the number of steps the worker's Trainer will run.
    try:
        total = TrainConfig(max_steps=hp.get("max_steps"), epochs=hp.get("epochs", 1), batch_size=hp["batch_size"],
                            grad_accum_steps=hp["grad_accum_steps"]).total_steps(n_train)
    except ValueError as e:
        raise HyperparameterError(f"hyperparameters.{e}") from None
    if total > MAX_STEPS:
        raise HyperparameterError(f"hyperparameters: {total} steps is more than {MAX_STEPS}; use fewer epochs")
    hp["total_steps"] = total
    hp.setdefault("warmup_steps", round(0.05 * total))
    hp.setdefault("eval_interval", max(1, total // 4))
    hp.setdefault("checkpoint_interval", max(1, total // 10))
    hp.setdefault("log_interval", max(1, total // 50))
    if lora:
        hp.setdefault("lora_rank", 8)
        hp.setdefault("lora_alpha", 2.0 * hp["lora_rank"] if isinstance(hp["lora_rank"], int) else 16.0)
        hp.setdefault("lora_dropout", 0.0)
        hp.setdefault("lora_target_modules", ["attn.c_attn", "attn.c_proj"])
        hp.setdefault("merge_lora", False)
    else:
        for name in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora"):
            if name in hp:
                raise HyperparameterError(f"hyperparameters.{name} applies to method LORA only (this job is FULL)")
    # Build the real configs once: they own the range checks.
    try:
        train_config(hp)
        if lora:
            cfg = lora_config(hp)
            hp["lora_target_modules"] = list(cfg.target_modules)
    except ValueError as e:
        raise HyperparameterError(f"hyperparameters.{e}") from None
    return hp


def train_config(hp: dict, keep_checkpoints: int = 3) -> TrainConfig:
    return TrainConfig(
        max_steps=hp["total_steps"], batch_size=hp["batch_size"], grad_accum_steps=hp["grad_accum_steps"],
        learning_rate=hp["learning_rate"], warmup_steps=hp["warmup_steps"], weight_decay=hp["weight_decay"],
        grad_clip=hp["grad_clip"], eval_interval=hp["eval_interval"], log_interval=hp["log_interval"],
        checkpoint_interval=hp["checkpoint_interval"], keep_checkpoints=keep_checkpoints, seed=hp["seed"],
    )


def lora_config(hp: dict) -> LoRAConfig:
    return LoRAConfig(rank=hp["lora_rank"], alpha=float(hp["lora_alpha"]), dropout=float(hp["lora_dropout"]),
                      target_modules=tuple(hp["lora_target_modules"]))


def check_suffix(suffix: str) -> str:
    suffix = suffix or "custom"
    if not SUFFIX_RE.match(suffix):
        raise ValueError(f"suffix {suffix!r} must be 1-40 characters of a-z, 0-9, '-' and '_', starting with a "
                         "letter or digit")
    return suffix


MAX_MODEL_NAME = 255  # the result is a directory of the model store: a file name's limit


def model_name(base_model: str, suffix: str, job_id: str) -> str:
    """``ft:<base>:<suffix>:<id>``: the result's name in the model store and the inference service.
    ``<id>`` is the job id's 12 hex digits (unique: CreateJob never reuses an id), so two jobs never
    publish under one name; CreateJob refuses a base + suffix whose name would pass ``MAX_MODEL_NAME``."""
    return f"ft:{base_model}:{suffix}:{job_id.removeprefix('ftjob-')}"


def check_model_name(base_model: str, suffix: str) -> None:
    longest = len(model_name(base_model, suffix, "ftjob-" + "0" * 12).encode())
    if longest > MAX_MODEL_NAME:
        raise ValueError(f"the result's name ft:<base>:<suffix>:<id> would be {longest} bytes, past the model "
                         f"store's limit of {MAX_MODEL_NAME}: use a shorter suffix (or base model name)")
