"""Structured output: token masks that force a completion to follow a JSON schema, a regex, a grammar
or a list of choices.

A constraint is a formal language over text. Before each token is sampled, the set of vocabulary
entries that keep the text a *prefix* of some string of the language is computed (the **mask**);
every other logit is set to ``-inf``, so greedy and sampled decoding alike can only pick an allowed
token. When the text is a complete string of the language the end-of-text token becomes allowed;
once the language admits nothing else, it is the only one. Choosing it ends the request with
finish_reason ``"stop"``; ``max_tokens`` first ends it with ``"length"`` and the partial text.

The masks come from `xgrammar <https://github.com/mlc-ai/xgrammar>`_ (chosen over llguidance and
outlines-core by ``bench/constraint_libraries.py``: ~4 us per mask step on GPT-2's 50,257 tokens
against ~300 us, and ms-scale compiles; see docs/generation.md). Its pieces, as used here:

* a **tokenizer info** (every token's bytes and the stop token), built once per tokenizer and
  shared by every engine that serves it (:func:`tokenizer_info`);
* a **compiled grammar** per constraint: a pushdown automaton with each state's token set
  precomputed. Compiling is the one-time cost (a few ms for a small schema; see ``bench/``), so
  :class:`Constraints` keeps the last ``cache_size`` of them, keyed by the constraint itself:
  requests with the same schema reuse it;
* a **matcher** per request: the automaton's current state. It fills the request's mask row and
  advances by each token the engine appends.

In the batched step (:class:`ModelRunner <lmcore.engine.runner.ModelRunner>`) only the rows of
constrained requests are touched: the runner asks :meth:`Constraints.begin_masks` for the step's
masks *before* the model's forward; a worker thread fills the bit masks and unpacks them into a
``(rows, V)`` additive mask (0 or ``-inf``) while the forward runs (xgrammar's calls go through
TVM-FFI, which releases the GIL, as torch's kernels do; small masks are filled inline, see
``OVERLAP_MIN_ENTRIES``), and :meth:`PendingMasks.apply` adds it to
those rows just before sampling, after the penalties. An unconstrained row is copied unchanged,
so its token is what it would be without constrained neighbours. Log-probabilities stay those of the model's own
distribution (**pre-mask**), as for every other sampling knob (see
:class:`lmcore.engine.sampling.TokenLogprob`).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

MAX_CONSTRAINT_CHARS = 64 * 1024  # a schema, regex or grammar's text
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024  # characters per choice
# Masks smaller than this many (row, token) entries are filled inline, before the forward: handing
# them to the worker thread cost more CPU than filling them (measured on the shipped 4,096-token
# model with 16 rows: +13% CPU per token on the thread, +4% inline), while 16 rows of GPT-2's
# 50,257 tokens cost the same CPU either way and the thread saved ~9% wall time.
OVERLAP_MIN_ENTRIES = 1 << 18
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")

# xgrammar 0.2's rule for a JSON string with minLength/maxLength admits raw control characters
# (U+0000-U+001F), which JSON forbids (json.loads refuses them). Its grammar text is patched to the
# class its unbounded strings use; a length-bounded string then simply has no escapes, still valid JSON.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'
_NEG_INF_BITS = np.int32(-8388608)  # 0xFF800000: float32 -inf; 0 is +0.0
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[01:55:48] /project/cpp/x.cc:94: " before a message


def constraint_of(params) -> tuple[str, str] | None:
    """``(kind, spec)`` of a :class:`~lmcore.engine.sampling.SamplingParams`' constraint, or None.

    ``spec`` is canonical text (the schema as sorted-key JSON, the choices as a JSON list), so it is
    also the compile cache's key."""
    if params.json_schema is not None:
        return "json_schema", params.json_schema
    if params.json_object:
        return "json_object", ""
    if params.regex is not None:
        return "regex", params.regex
    if params.grammar is not None:
        return "grammar", params.grammar
    if params.choice is not None:
        return "choice", json.dumps(params.choice)
    return None


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (JSON string literals are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def json_schema_grammar(schema: str) -> str:
    """The EBNF grammar of a JSON Schema: one line, separators ", " and ": ", properties in the
    schema's order, no properties it does not name (xgrammar's strict mode), and no raw control
    characters in strings (see ``_LOOSE_STRING_CHAR``)."""
    xgr = _import_xgrammar()
    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def _import_xgrammar():
    import xgrammar

    return xgrammar


_INFOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INFOS_LOCK = threading.Lock()


def tokenizer_info(tokenizer, vocab_size: int):
    """xgrammar's view of ``tokenizer`` over a model with ``vocab_size`` logits: each id's raw bytes
    and the end-of-text token as the stop token. Ids past the tokenizer (a padded embedding) are
    never allowed. Built once per (tokenizer, vocab_size) and shared."""
    xgr = _import_xgrammar()
    with _INFOS_LOCK:
        per_tok = _INFOS.setdefault(tokenizer, {})
        if vocab_size not in per_tok:
            vocab = [tokenizer.token_bytes(i) for i in range(min(tokenizer.vocab_size, vocab_size))]
            stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
            per_tok[vocab_size] = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                                    stop_token_ids=stop)
        return per_tok[vocab_size]


class Constraints:
    """The engine's structured-output state: the compiled grammars (an LRU cache) and each
    constrained request's matcher. Compiling is thread-safe (a service compiles in a worker thread
    to check a request before queueing it); matchers are used by the engine's step thread only."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 64):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._compiler = None
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()
        self._matchers: dict[str, object] = {}  # request id -> xgrammar.GrammarMatcher
        self._pool: ThreadPoolExecutor | None = None  # the mask filler, started on first use
        self._bitmask: torch.Tensor | None = None  # (rows, ceil(V/32)) int32, grown as needed
        self.overlap = True  # large masks fill on the worker thread during the forward (False: always inline)
        self.compiles = 0
        self.cache_hits = 0

    # --- compiling (validation) -----------------------------------------------------------------
    def compile(self, kind: str, spec: str):
        """The compiled grammar of one constraint, from the cache when seen before. ValueError
        naming the problem for a schema, regex or grammar the library refuses."""
        key = (kind, spec)
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                self.cache_hits += 1
                return hit
        compiled = self._compile(kind, spec)
        with self._lock:
            self._compiled[key] = compiled
            self.compiles += 1
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, kind: str, spec: str):
        if self.tokenizer is None:
            raise ValueError(f"a {kind} constraint needs a tokenizer (the engine was built without one)")
        compiler = self._get_compiler()
        try:
            if kind == "json_schema":
                return compiler.compile_grammar(json_schema_grammar(spec))
            if kind == "json_object":  # OpenAI's json_object: an object, any properties
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "grammar":
                return compiler.compile_grammar(spec)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(json.loads(spec)))
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's errors are RuntimeErrors
            message = _XGR_PREFIX.sub("", str(e).strip()).strip(" |") or type(e).__name__
            raise ValueError(f"invalid {kind.replace('_', ' ')}: {message}") from None
        raise ValueError(f"unknown constraint kind {kind!r}; expected one of {', '.join(CONSTRAINT_KINDS)}")

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _import_xgrammar()
                info = tokenizer_info(self.tokenizer, self.vocab_size)
                # Our own LRU above keys by the canonical constraint; xgrammar's cache would be a second copy.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    # --- requests ---------------------------------------------------------------------------------
    def add(self, request_id: str, kind: str, spec: str) -> None:
        """Start a matcher for a request (its grammar compiled, or taken from the cache)."""
        xgr = _import_xgrammar()
        self._matchers[request_id] = xgr.GrammarMatcher(self.compile(kind, spec))

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    @property
    def active(self) -> bool:
        """Whether any request in the engine is constrained (the step's only cost when none is)."""
        return bool(self._matchers)

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advance the request's matcher by its new token. Returns True when the grammar has
        ended (its stop token was taken, or nothing can follow); ValueError if the token is not
        allowed (only possible when the mask was bypassed)."""
        m = self._matchers[request_id]
        if not m.accept_token(token_id):
            raise ValueError(f"token {token_id} does not continue this request's constraint")
        return m.is_terminated()

    def allowed_prefix(self, request_id: str, tokens: list[int]) -> int:
        """How many leading ``tokens`` (a speculative proposal) the request's grammar accepts, up
        to and including a token that ends it; the matcher is left where it was (rolled back)."""
        m = self._matchers[request_id]
        n = 0
        for tok in tokens:
            if m.is_terminated() or not m.accept_token(tok):
                break
            n += 1
        if n:
            m.rollback(n)
        return n

    # --- the step's masks -------------------------------------------------------------------------
    def begin_masks(self, request_ids: list[str], proposals: list[tuple[str, list[int]]] = ()) -> PendingMasks | None:
        """Start filling the masks of the constrained rows among ``request_ids`` (the step's
        sampled rows, in order) and of every position of the constrained ``proposals``
        (``(request_id, draft)`` per verify chunk, in order: ``len(draft) + 1`` rows each, the
        grammar's mask after each prefix of the draft); None when nothing is constrained.

        Large masks fill on the worker thread while the forward runs (see ``OVERLAP_MIN_ENTRIES``)."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self._matchers]
        matchers = [self._matchers[request_ids[i]] for i in rows]
        verify_rows: list[int] = []
        drafts = []
        at = 0
        for rid, draft in proposals:
            if rid in self._matchers:
                verify_rows.extend(range(at, at + len(draft) + 1))
                drafts.append((self._matchers[rid], draft))
            at += len(draft) + 1
        n = len(rows) + len(verify_rows)
        if not n:
            return None
        if not self.overlap or n * self.vocab_size < OVERLAP_MIN_ENTRIES:
            done: Future = Future()
            done.set_result(self._fill(matchers, drafts, n))
            return PendingMasks(rows, verify_rows, done)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lmcore-masks")
        return PendingMasks(rows, verify_rows, self._pool.submit(self._fill, matchers, drafts, n))

    def _fill(self, matchers: list, drafts: list, n: int) -> torch.Tensor:
        """``(n, V)`` float32 additive mask: 0 where a token is allowed, -inf where not; the
        sampled rows' first, then each draft's ``len(draft) + 1`` positions."""
        bitmask = self._bitmask_rows(n)  # (n, ceil(V/32)) int32, reused across steps
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        row = len(matchers)
        for m, draft in drafts:  # walk the draft (checked by allowed_prefix), a mask per position, then undo it
            accepted = 0
            try:
                for tok in draft:
                    m.fill_next_token_bitmask(bitmask, row)
                    row += 1
                    m.accept_token(tok)
                    accepted += 1
                if m.is_terminated():  # the draft ends the grammar: the request stops there, the row is unused
                    bitmask[row] = -1
                else:
                    m.fill_next_token_bitmask(bitmask, row)
                row += 1
            finally:
                if accepted:
                    m.rollback(accepted)
        # Bit j of word w is token 32w+j (little-endian bytes), set when allowed. numpy's unpackbits
        # turns the refused bits into 0/1 bytes in one pass; times 0xFF800000 (-inf's bit pattern as an
        # int32) they are the additive mask. Measured on (16, 50257): ~0.2 ms here plus ~0.1 ms for the
        # add in the step, where torch's masked_fill took 1-6 ms (it is not vectorised on CPU).
        refused = np.unpackbits((~bitmask).numpy().view(np.uint8), axis=1, count=self.vocab_size, bitorder="little")
        additive = refused.astype(np.int32)
        additive *= _NEG_INF_BITS
        return torch.from_numpy(additive.view(np.float32))

    def _bitmask_rows(self, n: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.size(0) < n:
            self._bitmask = _import_xgrammar().allocate_token_bitmask(max(n, 2 * len(self._matchers)), self.vocab_size)
        return self._bitmask[:n]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class PendingMasks:
    """One step's masks being filled; :meth:`apply` and :meth:`apply_verify` wait for them and
    mask those rows."""

    __slots__ = ("rows", "verify_rows", "_future")

    def __init__(self, rows: list[int], verify_rows: list[int], future):
        self.rows = rows  # constrained rows among the sampled ones
        self.verify_rows = verify_rows  # constrained rows among the verify chunks' (concatenated)
        self._future = future

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampled rows' ``logits`` (R, V) with the constrained rows' disallowed tokens at
        ``-inf`` (a new tensor; the other rows' values are copied unchanged)."""
        return self._masked(logits, self.rows, 0)

    def apply_verify(self, logits: torch.Tensor) -> torch.Tensor:
        """The same for the verify chunks' rows, concatenated (every position of every chunk)."""
        return self._masked(logits, self.verify_rows, len(self.rows))

    def _masked(self, logits: torch.Tensor, rows: list[int], first: int) -> torch.Tensor:
        if not rows:
            return logits
        additive = self._future.result()[first:first + len(rows)].to(logits.device, non_blocking=True)
        if len(rows) == logits.size(0):
            return logits + additive
        return logits.index_add(0, torch.tensor(rows, device=logits.device), additive)

    def wait(self) -> None:
        """Let the filler finish (a step that failed before sampling must not leave it running)."""
        self._future.exception()
