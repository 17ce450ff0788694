"""lmcore: a readable, fast GPT-2 stack: model, tokenizer, generation engine, trainer.

One subpackage per layer; imports run one way (``lmcore._io`` is below everything)::

    tokenizer  <-  model  <-  lora  <-  engine
                     ^
                     +-- training, tasks   (model and tokenizer only)

Public names are imported lazily so ``import lmcore`` stays cheap (a service that only tokenizes
never pays for the engine's imports).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GPT": "lmcore.model",
    "GPTConfig": "lmcore.model",
    "PRESETS": "lmcore.model",
    "load_model": "lmcore.model",
    "save_pretrained": "lmcore.model",
    "inspect_tokens": "lmcore.model",
    "Inspection": "lmcore.model",
    "Tokenizer": "lmcore.tokenizer",
    "SamplingParams": "lmcore.engine",
    "TokenLogprob": "lmcore.engine",
    "generate": "lmcore.engine",
    "Completion": "lmcore.engine",
    "Engine": "lmcore.engine",
    "EngineConfig": "lmcore.engine",
    "EngineOverloaded": "lmcore.engine",
    "StepOutput": "lmcore.engine",
    "AsyncEngine": "lmcore.engine",
    "RenderedPrompt": "lmcore.tasks",
    "PromptStyle": "lmcore.tasks",
    "ChoiceScore": "lmcore.tasks",
    "FewShotPrompt": "lmcore.tasks",
    "score": "lmcore.tasks",
    "Trainer": "lmcore.training",
    "TrainConfig": "lmcore.training",
    "train_from_scratch": "lmcore.training",
    "LoRAConfig": "lmcore.lora",
    "apply_lora": "lmcore.lora",
    "load_adapter_model": "lmcore.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmcore' has no attribute {name!r}")
