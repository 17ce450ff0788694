"""The Inspect RPC's protobuf side: request checks, the size limit, lmcore's Inspection -> InspectResponse.

The computation is :func:`lmcore.model.inspection.inspect_tokens` (one plain forward pass); lmcore
checks the tokens, layers, heads and top_k. What is checked here is about the message: both
prompt forms at once, layers or heads without attention, and the size of the answer. Attention
grows with layers x heads x tokens^2 (float16 on the wire, 2 bytes each), so the size is estimated
*before* anything runs and refused with INVALID_ARGUMENT when it would pass the server's message
limit, saying how big it would be and how many layer-heads fit; the built message's exact size is
checked again before it is sent.

How it shares the model with the engine (``InspectRunner``): the forward runs on a worker thread of
its own, never under the engine's lock, so the engine's step thread keeps stepping while it runs;
the weights are only read, and the KV cache and the scheduler are not touched. A banked LoRA
adapter is chosen for that thread alone (``Engine.use_adapter``: routing is per thread), so the
streams decoding meanwhile keep their own adapters. One inspection runs at a time per server, on
``torch_threads`` intra-op threads (1 by default), so a burst of Inspect calls queues behind each
other instead of taking the cores the decode loop needs: a stream is slowed by at most the share
of CPU one forward pass takes while it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.errors import InvalidArgument
from services.gen.lmstack.v1 import inference_pb2 as pb
from services.limits import BoundedExecutor

if TYPE_CHECKING:
    from lmcore.model.inspection import Inspection

    from .handler import ServedModel

DEFAULT_TOP_K = 5
_PER_TOKEN_BYTES = 48  # a token's InspectToken + its position's fixed fields, generously
_PER_ALTERNATIVE_BYTES = 32  # one NextToken (id, short text, prob, framing)
_PER_LENS_ENTRY_BYTES = 24  # one layer x position of the logit lens


def request_ids(req: pb.InspectRequest, served: ServedModel) -> list[int]:
    """The request's tokens (its form only: lmcore checks the ids themselves)."""
    if req.text and req.token_ids:
        raise InvalidArgument("give either text or token_ids, not both")
    if req.token_ids:
        return list(req.token_ids)
    if not req.text:
        raise InvalidArgument("text is empty: give the text to inspect (or token_ids)")
    if req.allow_special:
        return served.tokenizer.encode(req.text, allowed_special="all")
    return served.tokenizer.encode(req.text)


def estimate_bytes(n_tokens: int, top_k: int, layer_heads: int, n_layer: int, lens: bool) -> int:
    """An upper estimate of the response's size: attention (2 bytes a weight) dominates."""
    from lmcore.model.inspection import attention_bytes

    size = n_tokens * (_PER_TOKEN_BYTES + top_k * _PER_ALTERNATIVE_BYTES)
    if lens:
        size += (n_layer + 1) * n_tokens * _PER_LENS_ENTRY_BYTES
    return size + attention_bytes(n_tokens, 1, layer_heads) + 64 * layer_heads


def _human(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def check_size(size: int, limit: int, n_tokens: int, layer_heads: int, fixed: int, exact: bool = False) -> None:
    """INVALID_ARGUMENT when ``size`` passes ``limit``, saying what to cut."""
    if size <= limit:
        return
    per_head = 2 * n_tokens * n_tokens
    fits = max(0, (limit - fixed) // per_head) if per_head else 0
    what = "is" if exact else "would be about"
    hint = (f"ask for fewer layers or heads (each layer x head is {per_head:,} bytes at {n_tokens} tokens; "
            f"{fits} of the {layer_heads} requested fit), or inspect a shorter text"
            if layer_heads else "inspect a shorter text or ask for a smaller top_k or no logit lens")
    raise InvalidArgument(f"the Inspect response {what} {_human(size)} ({size:,} bytes), past the server's "
                          f"message limit of {_human(limit)} ({limit:,} bytes): {hint}")


def response_pb(name: str, served: ServedModel, ins: Inspection) -> pb.InspectResponse:
    """lmcore's :class:`Inspection` as an ``InspectResponse`` (attention packed as float16)."""
    from lmcore.model.inspection import token_pieces

    tok = served.tokenizer
    cfg = served.model.config
    resp = pb.InspectResponse(model=name, n_layer=cfg.n_layer, n_head=cfg.n_head)
    pieces = token_pieces(tok, ins.token_ids)
    resp.tokens.extend(pb.InspectToken(id=p.id, piece=p.piece, text=p.text, start=p.start, end=p.end)
                       for p in pieces)
    texts: dict[int, str] = {p.id: p.text for p in pieces}

    def text_of(i: int) -> str:
        if i not in texts:
            texts[i] = token_pieces(tok, [i])[0].text
        return texts[i]

    top_ids, top_probs = ins.top_ids.tolist(), ins.top_probs.tolist()
    next_probs, next_ranks = ins.next_probs.tolist(), ins.next_ranks.tolist()
    surprise = ins.surprise_bits.tolist()
    for t in range(len(ins.token_ids)):
        pos = resp.positions.add()
        pos.top.extend(pb.NextToken(token_id=i, token=text_of(i), prob=p) for i, p in zip(top_ids[t], top_probs[t]))
        if t < len(next_probs):
            pos.has_next = True
            pos.next_prob, pos.next_rank, pos.surprise_bits = next_probs[t], next_ranks[t], surprise[t]
    for layer in ins.layers:
        weights = ins.attention[layer].half().contiguous()  # (H, T, T)
        data = weights.numpy().astype("<f2").tobytes()
        resp.attention.append(pb.LayerAttention(layer=layer, heads=ins.heads, shape=list(weights.shape),
                                                weights=data))
    if ins.lens_ids is not None:
        for depth, (ids, probs) in enumerate(zip(ins.lens_ids.tolist(), ins.lens_probs.tolist())):
            resp.logit_lens.append(pb.LensLayer(layer=depth, token_ids=ids, tokens=[text_of(i) for i in ids],
                                                probs=probs))
    return resp


def unpack_attention(layer: pb.LayerAttention):
    """A ``LayerAttention``'s weights as a float32 numpy array of its shape (for clients)."""
    import numpy as np

    return np.frombuffer(layer.weights, dtype="<f2").astype(np.float32).reshape(tuple(layer.shape))


class InspectRunner:
    """Runs inspections one at a time on a worker thread with its own torch thread count; at most
    ``max_waiting`` more wait for it, beyond that RESOURCE_EXHAUSTED (services.limits.BoundedExecutor,
    the bound Score has), so a burst of Inspect calls cannot queue without limit."""

    def __init__(self, torch_threads: int = 1, max_waiting: int = 16):
        self.torch_threads = torch_threads
        self.max_waiting = max_waiting
        self._pool: BoundedExecutor | None = None  # made on the first call (its thread starts then)

    def _init_thread(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)

    async def run(self, served: ServedModel, ids: list[int], top_k: int, layers, heads, attention: bool,
                  logit_lens: bool) -> Inspection:
        from lmcore.model.inspection import inspect_tokens

        if self._pool is None:
            self._pool = BoundedExecutor(1, self.max_waiting, "lmstack-inspect", initializer=self._init_thread)

        def work():
            # This thread only: the adapter's routing (or the base alone); the engine's batches are unaffected.
            with served.engine.use_adapter(served.adapter):
                return inspect_tokens(served.model, ids, top_k, layers, heads, attention, logit_lens)

        return await self._pool.run(work)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


async def inspect(req: pb.InspectRequest, name: str, served: ServedModel, runner: InspectRunner,
                  max_message_bytes: int) -> pb.InspectResponse:
    """The whole RPC once the model is resolved: check, estimate, run, build, check the size."""
    from lmcore.model.inspection import check_selection, check_tokens

    model = served.model
    ids = check_tokens(model, request_ids(req, served))
    top_k = req.top_k or DEFAULT_TOP_K
    if (req.layers or req.heads) and not req.attention:
        raise InvalidArgument("layers and heads choose attention weights: set attention=true to get them")
    layers, heads = check_selection(model, req.layers, req.heads, top_k)
    layer_heads = len(layers) * len(heads) if req.attention else 0
    T, n_layer = len(ids), model.config.n_layer
    estimate = estimate_bytes(T, top_k, layer_heads, n_layer, req.logit_lens)
    fixed = estimate_bytes(T, top_k, 0, n_layer, req.logit_lens)
    check_size(estimate, max_message_bytes, T, layer_heads, fixed)
    ins = await runner.run(served, ids, top_k, layers, heads, req.attention, req.logit_lens)
    resp = response_pb(name, served, ins)
    check_size(resp.ByteSize(), max_message_bytes, T, layer_heads, fixed, exact=True)
    return resp


__all__ = ["DEFAULT_TOP_K", "InspectRunner", "check_size", "estimate_bytes", "inspect", "request_ids",
           "response_pb", "unpack_attention"]
