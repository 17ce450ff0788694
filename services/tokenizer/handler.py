"""TokenizerHandler: protobuf in, ``lmcore.Tokenizer``, protobuf out. No transport code here.

The gRPC servicer (``services.tokenizer.servicer``) and a Ray Serve deployment both call these
methods with the request message and return what they return. Tokenizing a short text takes
microseconds, so it runs on the event loop (a thread hop would cost more than the work); texts
past ``OFFLOAD_CHARS`` in total go to a worker thread so one large request never stalls the others
(tiktoken's core releases the GIL).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from lmcore._io import has_tokenizer_files
from services.config import TokenizerSettings
from services.errors import InvalidArgument
from services.gen.lmstack.v1 import tokenizer_pb2 as pb
from services.models import ModelRegistry, ModelSpec, parse_model_specs, resolve_base

OFFLOAD_CHARS = 64 * 1024


async def _run(fn, *args, size: int = 0, **kwargs):
    """``fn(*args, **kwargs)`` inline when small, in a worker thread when ``size`` is large."""
    if size > OFFLOAD_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def load_tokenizer(spec: ModelSpec, registry: ModelRegistry):
    """A model directory's tokenizer (or a tokenizer file); an adapter uses its base model's."""
    from lmcore import Tokenizer

    path = spec.path
    if path.is_dir() and not has_tokenizer_files(path) and spec.is_adapter:
        base = resolve_base(spec, registry)
        if base is not None:
            return base.obj
        path = Path(spec.base_model)
        if not path.is_absolute() and not path.exists():
            path = spec.path.parent / path
    if not path.exists():
        raise ValueError(f"{path}: no such tokenizer file or model directory")
    return Tokenizer.from_file(path)


def tokenizer_registry(settings: TokenizerSettings) -> ModelRegistry:
    return ModelRegistry(parse_model_specs(settings.models), load_tokenizer, settings.default_model,
                         settings.model_store)


class TokenizerHandler:
    """Encode, EncodeBatch, Decode and CountTokens over the registry's tokenizers."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    async def _tokenizer(self, model: str):
        entry = self.registry.lookup(model) or await self.registry.get(model)
        return entry.obj

    async def encode(self, req: pb.EncodeRequest) -> pb.EncodeResponse:
        tok = await self._tokenizer(req.model)
        special = {"allowed_special": "all"} if req.allow_special else {}
        return pb.EncodeResponse(token_ids=await _run(tok.encode, req.text, size=len(req.text), **special))

    async def encode_batch(self, req: pb.EncodeBatchRequest) -> pb.EncodeBatchResponse:
        tok = await self._tokenizer(req.model)
        texts = list(req.texts)
        special = {"allowed_special": "all"} if req.allow_special else {}
        batches = await _run(tok.encode_batch, texts, size=sum(map(len, texts)), **special)
        return pb.EncodeBatchResponse(items=[pb.TokenIds(token_ids=ids) for ids in batches])

    async def decode(self, req: pb.DecodeRequest) -> pb.DecodeResponse:
        tok = await self._tokenizer(req.model)
        ids = list(req.token_ids)
        bad = [i for i in ids if i < 0 or i >= tok.vocab_size]
        if bad:
            raise InvalidArgument(f"token id(s) {bad[:5]} out of range: this tokenizer's ids are "
                                  f"0..{tok.vocab_size - 1}")
        return pb.DecodeResponse(text=await _run(tok.decode, ids, size=len(ids) * 4))

    async def count_tokens(self, req: pb.CountTokensRequest) -> pb.CountTokensResponse:
        tok = await self._tokenizer(req.model)
        special = {"allowed_special": "all"} if req.allow_special else {}
        return pb.CountTokensResponse(count=await _run(tok.count, req.text, size=len(req.text), **special))
