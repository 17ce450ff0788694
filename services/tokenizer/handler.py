"""TokenizerHandler: protobuf in, ``lmcore.Tokenizer``, protobuf out. No transport code here.

The gRPC servicer (``services.tokenizer.servicer``) and a Ray Serve deployment both call these
methods with the request message and return what they return. Tokenizing a short text takes
microseconds, so it runs on the event loop (a thread hop would cost more than the work); texts
past ``services.limits.OFFLOAD_CHARS`` in total go to a worker thread so one large request never
stalls the others (tiktoken's core releases the GIL).

Bounded work: every request is checked against the settings (``TokenizerSettings``) before any
tokenizing: ``max_batch_texts`` texts per EncodeBatch, ``max_text_bytes`` of text per Encode,
EncodeBatch or CountTokens, ``max_decode_ids`` ids per Decode; and an answer that could exceed the
message limit (``max_message_bytes``: at most one id per byte of text) is refused up front rather
than computed and then failing to send.
"""

from __future__ import annotations

from pathlib import Path

from lmcore._io import has_tokenizer_files
from services import tenants
from services.config import TokenizerSettings
from services.errors import InvalidArgument
from services.gen.lmstack.v1 import tokenizer_pb2 as pb
from services.limits import offload, response_bound
from services.metrics import TokenizerMetrics
from services.models import ModelRegistry, ModelSpec, parse_model_specs, resolve_base


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


def tokenizer_registry(settings: TokenizerSettings, metrics: TokenizerMetrics | None = None) -> ModelRegistry:
    start = None
    if metrics is not None:
        async def start(entry) -> None:  # its series exist from the moment it serves
            metrics.model_loaded(entry.name)
    return ModelRegistry(parse_model_specs(settings.models), load_tokenizer, settings.default_model,
                         settings.model_store, start_entry=start,
                         refresh_interval_s=settings.store_refresh_interval_s)


class TokenizerHandler:
    """Encode, EncodeBatch, Decode and CountTokens over the registry's tokenizers; with ``metrics``,
    each counts its tokens and text bytes (``lmstack_tokenizer_tokens_total``, ``..._text_bytes_total``)."""

    def __init__(self, registry: ModelRegistry, settings: TokenizerSettings | None = None,
                 metrics: TokenizerMetrics | None = None):
        self.registry = registry
        self.limits = settings if settings is not None else TokenizerSettings()
        self.metrics = metrics

    async def _tokenizer(self, model: str):
        tenant = tenants.current()  # another tenant's fine-tuned model is NOT_FOUND here too
        entry = self.registry.lookup(model)
        if entry is None or not tenant.owns(entry.spec.owner):
            entry = await self.registry.get(model, tenant)
        return entry.name, entry.obj

    def _count(self, model: str, method: str, tokens: int, texts) -> None:
        if self.metrics is not None:  # isascii() is O(1) in CPython: encode only non-ASCII text
            n_bytes = sum(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in texts)
            self.metrics.observe(model, method, tokens, n_bytes)

    def _check_texts(self, texts, tok, what: str) -> int:
        """Total characters of ``texts`` after the size checks (bytes, and the answer's size)."""
        chars = sum(map(len, texts))
        limit = self.limits.max_text_bytes
        # A character is 1-4 UTF-8 bytes: count bytes only when 4 per character does not settle it.
        n_bytes = 4 * chars
        if n_bytes > limit or response_bound(n_bytes, tok.vocab_size, len(texts)) > self.limits.max_message_bytes:
            n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if n_bytes > limit:
            raise InvalidArgument(f"{what} is {n_bytes} bytes of text, more than the limit of {limit} bytes "
                                  "(max_text_bytes): split it into smaller requests")
        # At most one token per byte of text (special tokens are longer than one byte).
        bound = response_bound(n_bytes, tok.vocab_size, len(texts))
        if bound > self.limits.max_message_bytes:
            raise InvalidArgument(f"{what} of {n_bytes} bytes could encode to a {bound}-byte answer, past the "
                                  f"message limit of {self.limits.max_message_bytes} bytes: split it")
        return chars

    async def encode(self, req: pb.EncodeRequest) -> pb.EncodeResponse:
        name, tok = await self._tokenizer(req.model)
        size = self._check_texts((req.text,), tok, "the text")
        special = {"allowed_special": "all"} if req.allow_special else {}
        ids = await offload(tok.encode, req.text, size=size, **special)
        self._count(name, "encode", len(ids), (req.text,))
        return pb.EncodeResponse(token_ids=ids)

    async def encode_batch(self, req: pb.EncodeBatchRequest) -> pb.EncodeBatchResponse:
        name, tok = await self._tokenizer(req.model)
        n, limit = len(req.texts), self.limits.max_batch_texts
        if n > limit:
            raise InvalidArgument(f"too many texts: {n} given, at most {limit} per EncodeBatch (max_batch_texts)")
        texts = list(req.texts)
        size = self._check_texts(texts, tok, "the batch")
        special = {"allowed_special": "all"} if req.allow_special else {}
        batches = await offload(tok.encode_batch, texts, size=max(size, n * 64), **special)
        self._count(name, "encode_batch", sum(map(len, batches)), texts)
        return pb.EncodeBatchResponse(items=[pb.TokenIds(token_ids=ids) for ids in batches])

    async def decode(self, req: pb.DecodeRequest) -> pb.DecodeResponse:
        name, tok = await self._tokenizer(req.model)
        n, limit = len(req.token_ids), self.limits.max_decode_ids
        if n > limit:
            raise InvalidArgument(f"too many token ids: {n} given, at most {limit} per Decode (max_decode_ids)")
        max_bytes = self.limits.max_message_bytes - 64

        def decode() -> str:
            ids = list(req.token_ids)
            bad = [i for i in ids if i < 0 or i >= tok.vocab_size]
            if bad:
                raise InvalidArgument(f"token id(s) {bad[:5]} out of range: this tokenizer's ids are "
                                      f"0..{tok.vocab_size - 1}")
            data = tok.decode_bytes(ids)
            # Each byte becomes at most 3 (an invalid byte is U+FFFD): check before building the text.
            if 3 * len(data) > max_bytes and len(text := data.decode("utf-8", "replace").encode()) > max_bytes:
                raise InvalidArgument(f"the decoded text is {len(text)} bytes, past the message limit of "
                                      f"{max_bytes} bytes: decode fewer ids per request")
            return data.decode("utf-8", "replace")

        text = await offload(decode, size=n * 4)
        self._count(name, "decode", n, (text,))
        return pb.DecodeResponse(text=text)

    async def count_tokens(self, req: pb.CountTokensRequest) -> pb.CountTokensResponse:
        name, tok = await self._tokenizer(req.model)
        limit = self.limits.max_text_bytes
        chars = len(req.text)
        n_bytes = chars if 4 * chars <= limit else len(req.text.encode("utf-8", "surrogatepass"))
        if n_bytes > limit:
            raise InvalidArgument(f"the text is {n_bytes} bytes, more than the limit of {limit} bytes "
                                  "(max_text_bytes): count it in pieces")
        special = {"allowed_special": "all"} if req.allow_special else {}
        count = await offload(tok.count, req.text, size=chars, **special)
        self._count(name, "count_tokens", count, (req.text,))
        return pb.CountTokensResponse(count=count)
