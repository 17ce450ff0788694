"""Offline generation: ``generate(model, prompts, params)`` runs a batch of prompts to completion.

Like vLLM's offline ``LLM.generate``: the same engine the server uses (KV cache, continuous
batching, sampling), driven in-process until every prompt is done. One call batches all prompts.

(The module is ``offline``, not ``generate``: a submodule named like the function it exports
would replace ``lmcore.generate`` the function with the module as soon as it is imported.)
"""

from __future__ import annotations

from lmcore.model.gpt import GPT

from .engine import Engine
from .outputs import Completion, collect
from .sampling import SamplingParams


def generate(model: GPT, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
             tokenizer=None, **engine_kwargs) -> list[Completion]:
    """Complete every prompt; results in prompt order. ``engine_kwargs`` override :class:`EngineConfig` fields.

    ``params`` is one :class:`SamplingParams` for all prompts or a list with one per prompt. The KV
    cache is sized for this call (all prompts at once, up to the longest prompt + ``max_tokens``),
    so nothing waits in a queue and no memory is reserved beyond need.
    """
    if not prompts:
        return []
    if isinstance(prompts[0], int):
        raise ValueError("prompts must be a list of token-id lists (a batch), e.g. [[464, 3290]]")
    if isinstance(params, list | tuple):
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        per_prompt = list(params)
    else:
        per_prompt = [params if params is not None else SamplingParams()] * len(prompts)
    longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, per_prompt))
    kwargs = dict(max_batch_size=len(prompts), max_waiting=len(prompts), enable_prefix_cache=False,
                  max_seq_len=min(longest, model.config.block_size), prefill_chunk_size=max(256, longest))
    engine = Engine(model, tokenizer=tokenizer, **{**kwargs, **engine_kwargs})
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
    done: dict[str, Completion] = {}
    while engine.has_unfinished():
        collect(engine.step(), done, tokenizer is not None)
    return [done[i] for i in ids]
