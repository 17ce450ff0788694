"""The engine layer: sampling, the scheduler, the model runner, the batching engine and its front ends.

Reading order, as vLLM's layers: ``sampling`` (what a request asks for) -> ``scheduler`` (who runs
this step, token counts only, no torch) -> ``runner`` (weights' fast layouts, KV cache, one forward
pass + sampling; ``weight_layout``, ``prefix_cache``) -> ``engine`` (``step()`` = schedule, run,
emit) -> ``async_engine`` (a step thread for asyncio servers) and ``offline`` (``generate``).
Imports the model and LoRA layers, never a service.
"""

from .async_engine import AsyncEngine
from .constraints import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_CONSTRAINT_CHARS
from .engine import Engine, EngineConfig, EngineOverloaded, check_context, check_prompt_chars
from .offline import generate
from .outputs import Completion, StepOutput
from .sampling import MAX_LOGPROBS, MAX_STOP_LENGTH, MAX_STOP_STRINGS, SamplingParams, TokenLogprob

__all__ = ["AsyncEngine", "Completion", "MAX_CHOICES", "MAX_CHOICE_CHARS", "MAX_CONSTRAINT_CHARS", "Engine", "EngineConfig", "EngineOverloaded", "MAX_LOGPROBS",
           "MAX_STOP_LENGTH", "MAX_STOP_STRINGS", "SamplingParams", "StepOutput", "TokenLogprob", "check_context",
           "check_prompt_chars", "generate"]
