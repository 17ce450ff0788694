"""OpenAI's completions and chat completions, mapped onto ``InferenceHandler.complete`` / ``complete_stream``.

Each choice of a request (``prompts x n``) becomes one ``lmstack.v1.CompleteRequest`` and runs
through the very calls the gRPC servicer makes, so sampling, validation, limits and errors are
the handler's and lmcore's, never restated here. What this module owns is OpenAI's *shape*:

* the prompt forms (a string, strings, token ids, lists of token ids), ``n`` choices (choice ``i``
  of a seeded request uses ``seed + i``: reproducible and distinct), ``echo`` (the prompt's text,
  and with ``logprobs`` its tokens' log-probabilities, from ``CompleteRequest.prompt_logprobs``:
  the first is null, as OpenAI's is), ``max_tokens: 0`` with ``echo`` (score the prompt only);
* ``logprobs`` as OpenAI lays it out (``tokens``, ``token_logprobs``, ``top_logprobs``,
  ``text_offset`` for completions; ``content`` for chat) and finish reasons ("eos" -> "stop");
* server-sent events: ``data: {...}`` chunks, ``stream_options.include_usage``'s usage chunk,
  then ``data: [DONE]``. Every choice's first chunk is awaited before the response starts, so a
  bad request is an ordinary 4xx, not an error inside a 200 stream. A client that disconnects
  cancels the response task, which closes the handler streams: their engine requests are
  aborted before the next step (as a cancelled gRPC call's are).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from services.gen.lmstack.v1 import common_pb2
from services.gen.lmstack.v1 import inference_pb2 as pb

from .errors import HttpError, from_exception
from .schemas import MAX_CHOICES, MAX_PROMPTS, ChatCompletionRequest, CompletionRequest

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
SAMPLING_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                   "repetition_penalty", "ignore_eos", "speculation", "speculative_tokens")


def refuse_unsupported(body) -> None:
    refused = body.refused_fields()
    if refused:
        field, why = refused[0]
        raise HttpError(400, f"{why}; see docs/openai.md for the fields lmstack supports", field,
                        "unsupported_parameter")


def _seed(seed: int, i: int) -> int:
    return ((seed + i + 2**63) % 2**64) - 2**63  # seed + i, wrapped into int64


def sampling_pb(body, max_tokens: int | None, logprobs: int | None, choice: int) -> common_pb2.SamplingParams:
    """The OpenAI fields -> ``lmstack.v1.SamplingParams`` (unset fields keep lmcore's defaults)."""
    sp = common_pb2.SamplingParams()
    for f in SAMPLING_FIELDS:
        v = getattr(body, f)
        if v is not None:
            setattr(sp, f, v)
    if max_tokens is not None:
        sp.max_tokens = max_tokens
    if body.stop is not None:
        sp.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.seed is not None:
        sp.seed = _seed(body.seed, choice)
    if logprobs is not None:
        sp.logprobs = max(1, logprobs)  # lmcore's 0 means "none"; OpenAI's 0 means "the token's own only"
    constraint_pb(body, sp)
    return sp


def constraint_pb(body, sp: common_pb2.SamplingParams) -> None:
    """``response_format`` / vLLM's ``guided_*`` -> the constraint fields (the body refused two at
    once; whether a schema, regex or grammar compiles is lmcore's check, a 400 naming the problem)."""
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        sp.json_object = True
    elif rf is not None and rf.type == "json_schema":
        sp.json_schema = json.dumps(rf.json_schema.schema_)
    if body.guided_json is not None:
        sp.json_schema = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
    if body.guided_regex is not None:
        sp.regex = body.guided_regex
    if body.guided_choice is not None:
        if not body.guided_choice:
            raise HttpError(400, "guided_choice is empty: give at least one string", "guided_choice")
        sp.choice.extend(body.guided_choice)
    if body.guided_grammar is not None:
        sp.grammar = body.guided_grammar


def split_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise HttpError(400, "prompt is empty: give a string, strings, token ids or lists of token ids", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise HttpError(400, f"{len(prompt)} prompts given, at most {MAX_PROMPTS} per request", "prompt")
    return list(prompt)


class _Choice:
    """One choice being produced: its request and what OpenAI's shape needs to show it."""

    __slots__ = ("index", "req", "prompt_text", "offset")

    def __init__(self, index: int, req: pb.CompleteRequest, prompt_text: str | None):
        self.index, self.req, self.prompt_text = index, req, prompt_text
        self.offset = 0  # characters shown so far (text_offset)


# --- shapes ---------------------------------------------------------------------------------------
class CompletionShape:
    """``text_completion`` objects."""

    object_unary = object_chunk = "text_completion"

    def __init__(self, body: CompletionRequest):
        self.body = body
        self.echo = body.echo
        self.logprobs = body.logprobs

    def choices(self, model: str, prompts: list, texts: list[str | None]) -> list[_Choice]:
        b = self.body
        if b.max_tokens == 0 and not b.echo:
            raise HttpError(400, "max_tokens must be at least 1 (0 is allowed only with echo: true, to "
                                 "score the prompt)", "max_tokens")
        out = []
        for p, (prompt, text) in enumerate(zip(prompts, texts)):
            for i in range(b.n):
                index = p * b.n + i
                req = pb.CompleteRequest(model=model, sampling=sampling_pb(b, b.max_tokens, b.logprobs, i))
                if isinstance(prompt, str):
                    req.prompt = prompt
                else:
                    req.prompt_token_ids.extend(prompt)
                if b.echo and (b.logprobs is not None or b.max_tokens == 0):
                    req.prompt_logprobs = b.logprobs or 0
                out.append(_Choice(index, req, text))
        return out

    def logprobs_of(self, choice: _Choice, entries, prompt_entries=()) -> dict | None:
        if self.logprobs is None:
            return None
        n = self.logprobs
        tokens, values, tops, offsets = [], [], [], []
        at = choice.offset
        for k, e in enumerate(prompt_entries):
            tokens.append(e.token)
            first = k == 0
            values.append(None if first else e.logprob)
            tops.append(None if first else {t.token: t.logprob for t in e.top_logprobs[:n]})
            offsets.append(at)
            at += len(e.token)
        for e in entries:
            tokens.append(e.token)
            values.append(e.logprob)
            tops.append({t.token: t.logprob for t in e.top_logprobs[:n]})
            offsets.append(at)
            at += len(e.token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def unary_choice(self, choice: _Choice, resp: pb.CompleteResponse) -> dict:
        echo = choice.prompt_text if self.echo else ""
        choice.offset = 0 if self.echo else len(choice.prompt_text or "")
        lp = self.logprobs_of(choice, resp.logprobs, resp.prompt_logprobs if self.echo else ())
        return {"index": choice.index, "text": echo + resp.text, "logprobs": lp,
                "finish_reason": FINISH.get(resp.finish_reason, resp.finish_reason)}

    def chunk_choice(self, choice: _Choice, chunk: pb.CompleteChunk, first: bool) -> dict:
        text = chunk.text
        prompt_entries = ()
        if first:
            choice.offset = 0 if self.echo else len(choice.prompt_text or "")
            if self.echo:
                text = choice.prompt_text + text
                prompt_entries = chunk.prompt_logprobs
        lp = self.logprobs_of(choice, chunk.logprobs, prompt_entries) if self.logprobs is not None else None
        if lp is not None:
            choice.offset = lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"] else choice.offset
        return {"index": choice.index, "text": text, "logprobs": lp,
                "finish_reason": FINISH.get(chunk.finish_reason) if chunk.finish_reason else None}


class ChatShape:
    """``chat.completion`` / ``chat.completion.chunk`` objects."""

    object_unary, object_chunk = "chat.completion", "chat.completion.chunk"

    def __init__(self, body: ChatCompletionRequest):
        self.body = body
        self.top = body.top_logprobs or 0

    def choices(self, model: str, prompts: list, texts: list) -> list[_Choice]:
        b = self.body
        max_tokens = b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens
        out = []
        for i in range(b.n):
            req = pb.CompleteRequest(model=model, prompt=prompts[0], allow_special=True,
                                     sampling=sampling_pb(b, max_tokens, self.top if b.logprobs else None, i))
            out.append(_Choice(i, req, prompts[0]))
        return out

    def logprobs_of(self, entries) -> dict | None:
        if not self.body.logprobs:
            return None
        return {"content": [
            {"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                              for t in e.top_logprobs[:self.top]]} for e in entries]}

    def unary_choice(self, choice: _Choice, resp: pb.CompleteResponse) -> dict:
        return {"index": choice.index, "message": {"role": "assistant", "content": resp.text},
                "logprobs": self.logprobs_of(resp.logprobs),
                "finish_reason": FINISH.get(resp.finish_reason, resp.finish_reason)}

    def chunk_choice(self, choice: _Choice, chunk: pb.CompleteChunk, first: bool) -> dict:
        delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        if chunk.finish_reason and not chunk.text and not first:
            delta = {}
        return {"index": choice.index, "delta": delta, "logprobs": self.logprobs_of(chunk.logprobs),
                "finish_reason": FINISH.get(chunk.finish_reason) if chunk.finish_reason else None}


# --- running ---------------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def run_unary(handler, shape, model: str, choices: list[_Choice]) -> dict:
    tasks = [asyncio.ensure_future(handler.complete(c.req)) for c in choices]
    try:
        responses = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    n = getattr(shape.body, "n", 1)
    prompt_tokens = sum(r.usage.prompt_tokens for r in responses[::n])
    return {"id": _id(shape), "object": shape.object_unary, "created": int(time.time()),
            "model": responses[0].model or model,
            "choices": [shape.unary_choice(c, r) for c, r in zip(choices, responses)],
            "usage": _usage(prompt_tokens, sum(r.usage.completion_tokens for r in responses))}


def _id(shape) -> str:
    return ("chatcmpl-" if isinstance(shape, ChatShape) else "cmpl-") + uuid.uuid4().hex[:24]


async def open_streams(handler, choices: list[_Choice]) -> list[tuple]:
    """Start every choice's stream and wait for its first chunk (validation errors surface here,
    before any byte of the response is sent). Returns ``(stream, first chunk or None)`` pairs."""
    streams = [handler.complete_stream(c.req) for c in choices]
    firsts = [asyncio.ensure_future(anext(s, None)) for s in streams]
    try:
        got = await asyncio.gather(*firsts)
    except BaseException:
        for f in firsts:
            f.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in streams:
            await s.aclose()
        raise
    return list(zip(streams, got))


async def sse_events(shape, model: str, choices: list[_Choice], opened: list[tuple], include_usage: bool):
    """The response body: ``data: {...}`` per chunk, the usage chunk when asked, ``data: [DONE]``."""
    head = json.dumps({"id": _id(shape), "object": shape.object_chunk, "created": int(time.time()),
                       "model": model})[:-1] + ', "choices": ['
    n = getattr(shape.body, "n", 1)
    usage = {"prompt": 0, "completion": 0}

    def event(choice: _Choice, chunk: pb.CompleteChunk, first: bool) -> str:
        if chunk.finish_reason:
            if choice.index % n == 0:
                usage["prompt"] += chunk.usage.prompt_tokens
            usage["completion"] += chunk.usage.completion_tokens
        return f"data: {head}{json.dumps(shape.chunk_choice(choice, chunk, first))}]}}\n\n"

    try:
        if len(choices) == 1:  # the common case: no task per stream
            (stream, first), choice = opened[0], choices[0]
            if first is not None:
                yield event(choice, first, True)
                async for chunk in stream:
                    yield event(choice, chunk, False)
        else:
            async for choice, chunk, is_first in _merged(choices, opened):
                yield event(choice, chunk, is_first)
        if include_usage:
            yield f"data: {head}], \"usage\": {json.dumps(_usage(usage['prompt'], usage['completion']))}}}\n\n"
    except Exception as exc:  # after the 200 went out: OpenAI's clients read an "error" event
        yield f"data: {json.dumps(from_exception(exc)[1])}\n\n"
    finally:
        for stream, _ in opened:
            await stream.aclose()  # aborts an unfinished engine request (a client that went away)
    yield "data: [DONE]\n\n"


async def _merged(choices: list[_Choice], opened: list[tuple]):
    """Several choices' streams interleaved as their chunks come (one pump task each)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(choice, stream, first):
        try:
            if first is not None:
                await queue.put((choice, first, True))
                async for chunk in stream:
                    await queue.put((choice, chunk, False))
            await queue.put((choice, done, False))
        except Exception as e:  # noqa: BLE001 - handed to the response, which reports it
            await queue.put((choice, e, False))

    tasks = [asyncio.ensure_future(pump(c, s, f)) for c, (s, f) in zip(choices, opened)]
    try:
        remaining = len(tasks)
        while remaining:
            choice, item, is_first = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield choice, item, is_first
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def check_choices(choices: list[_Choice]) -> None:
    if len(choices) > MAX_CHOICES:
        raise HttpError(400, f"prompts x n = {len(choices)} choices, at most {MAX_CHOICES} per request", "n")
