"""lmcore: a readable, fast GPT-2 stack: model, tokenizer, generation engine, trainer.

Public names are imported lazily so ``import lmcore`` stays cheap (a service that only tokenizes
never pays for the engine's imports).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GPT": "lmcore.model",
    "GPTConfig": "lmcore.config",
    "PRESETS": "lmcore.config",
    "load_model": "lmcore.checkpoint",
    "save_pretrained": "lmcore.checkpoint",
    "Tokenizer": "lmcore.tokenizer",
    "SamplingParams": "lmcore.sampling",
    "generate": "lmcore.generation",
    "Completion": "lmcore.generation",
    "Engine": "lmcore.engine",
    "EngineOverloaded": "lmcore.engine",
    "StepOutput": "lmcore.engine",
    "AsyncEngine": "lmcore.async_engine",
    "TokenLogprob": "lmcore.sampling",
    "RenderedPrompt": "lmcore.fewshot",
    "PromptStyle": "lmcore.fewshot",
    "ChoiceScore": "lmcore.scoring",
    "FewShotPrompt": "lmcore.fewshot",
    "score": "lmcore.scoring",
    "Trainer": "lmcore.trainer",
    "TrainConfig": "lmcore.trainer",
    "train_from_scratch": "lmcore.trainer",
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
