"""Byte-level BPE: text <-> token ids, exactly GPT-2's, on tiktoken's Rust core.

A language model reads integers, so text must become a sequence of ids from a fixed vocabulary.
GPT-2's answer, byte-level byte-pair encoding, in four ideas:

1. **Bytes, not characters.** Text is first encoded as UTF-8, so the alphabet is just the 256 byte
   values: any string in any script (or emoji, or binary junk) is representable, and there is no
   "unknown token". The price: one character may span several bytes, hence several tokens
   ("🤗" is 4 bytes; GPT-2 spends 3 tokens on it), which is why decoding a *prefix* of the ids can
   end mid-character (see ``StreamDecoder``).
2. **Merges.** Training starts from those 256 single-byte tokens and repeatedly finds the most
   frequent adjacent pair in the corpus (``b"t" b"h"``) and adds their concatenation (``b"th"``) as
   a new token. Each such step is a *merge*; GPT-2 learned 50,000 of them.
3. **Ranks.** Encoding replays the merges in the order they were learned: among all adjacent pairs
   of the current pieces, join the one learned earliest, until no pair is a token. tiktoken stores
   this as a *rank* per token (its id, here): the lower the rank, the earlier the merge, so BPE is
   "join the adjacent pair whose concatenation has the lowest rank". ``bpe_io.bpe_parts`` is that
   loop in ten lines of Python; tiktoken runs it in Rust.
4. **Pre-tokenization.** Before BPE the text is cut by a regex (``GPT2_PATTERN``) into words,
   numbers, punctuation runs and whitespace runs, each with at most one leading space. BPE runs on
   each chunk alone, so a token never straddles "dog" and "." and the leading space belongs to the
   word: ``" the"`` is one token. In GPT-2's vocab files that space shows up as ``Ġ``
   (``bpe_io.bytes_to_unicode`` explains why).

Special tokens (``<|endoftext|>``, id 50256 in GPT-2) are not produced by BPE; they are control
signals. Policy (tiktoken's): ``encode`` treats their text as ordinary text unless you allow them
(``allowed_special="all"`` or a set of names), so user input cannot forge an end-of-text marker.

Decoding concatenates each id's bytes and decodes UTF-8 with ``errors="replace"``: an id sequence
that cuts a character in half (or a model that emits nonsense) yields U+FFFD, never an exception.

Hot paths (``encode``, ``encode_batch``, ``decode``) call tiktoken's ``CoreBPE`` directly: the
Python ``tiktoken.Encoding.encode`` would first scan the text with a regex for disallowed special
tokens, which our policy never needs.
"""

from __future__ import annotations

import codecs
import os
import threading
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import tiktoken

from . import files as bpe_io
from .files import ENDOFTEXT, GPT2_PATTERN

__all__ = ["Tokenizer", "StreamDecoder", "GPT2_PATTERN", "ENDOFTEXT"]

AllowedSpecial = Literal["all"] | Collection[str]
_BAD_ID_ERRORS = (KeyError, OverflowError, TypeError)  # what the Rust core raises for a bad id


class Tokenizer:
    """A byte-level BPE tokenizer: ``encode``/``decode`` text, ``train`` and ``save`` vocabularies.

    Build one with ``Tokenizer.from_file`` (a ``*.tiktoken`` rank file, a ``tokenizer.json``, or a
    directory), ``Tokenizer.gpt2(path)`` or ``Tokenizer.train``. Instances are immutable and
    thread-safe.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        *,
        eos_token: str | None = ENDOFTEXT,
        name: str = "bpe",
        merges: list[tuple[bytes, bytes]] | None = None,
        _encoding: tiktoken.Encoding | None = None,
    ):
        """``ranks``: token bytes -> id (= merge priority); ``special_tokens``: name -> id;
        ``pattern``: the pre-tokenizer regex; ``eos_token``: which special token ends a text
        (``eos_id`` is None when it is absent); ``merges``: the merge list if known (else it is
        recovered from ``ranks`` when saving)."""
        special_tokens = dict(special_tokens or {})
        bpe_io.validate_vocab(ranks, special_tokens, name)
        try:
            self._encoding = _encoding or tiktoken.Encoding(
                name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
            )
        except ValueError as e:  # tiktoken compiles the regex here
            raise ValueError(f"{name}: invalid pre-tokenizer pattern {pattern!r}: {e}") from None
        self._core = self._encoding._core_bpe  # the Rust object every hot path calls directly
        self._ranks = dict(ranks)
        self._special = special_tokens
        self._special_set = frozenset(special_tokens)
        self._pattern = pattern
        self._merges = merges
        self._eos_token = eos_token if eos_token in special_tokens else None
        self.name = name
        self.vocab_size: int = self._encoding.max_token_value + 1
        """Number of ids, special tokens included: ids run over ``range(vocab_size)``."""
        self.max_token_chars: int = max([1, *map(len, self._ranks), *map(len, special_tokens)])
        """The most characters one token stands for (its bytes, or a special token's name): a text
        of ``n`` characters is at least ``ceil(n / max_token_chars)`` tokens, so a text too long for
        a context can be refused before it is tokenized."""
        self._pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool)
        self._pool_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        special_tokens: dict[str, int] | None = None,
        pattern: str | None = None,
    ) -> Tokenizer:
        """Load a tokenizer from a ``*.tiktoken`` rank file, a ``tokenizer.json``, GPT-2's
        ``vocab.json`` + ``merges.txt`` (or OpenAI's original names ``encoder.json`` + ``vocab.bpe``),
        or a directory holding one of those (looked for in that order; a directory may instead hold
        a single ``*.tiktoken``). An ``eos_token`` in a ``tokenizer_config.json`` beside a Hugging
        Face layout is honoured (``<|endoftext|>`` otherwise).

        A tiktoken rank file carries neither special tokens nor the regex: they default to GPT-2's
        (``GPT2_PATTERN``, and ``<|endoftext|>`` at id ``max rank + 1``, i.e. 50256 for GPT-2's
        50,256 ranks); pass ``special_tokens``/``pattern`` to override. Hugging Face layouts carry
        their own and are converted to ranks only when the conversion is exact (``ValueError``
        otherwise, naming the offending token or merge).
        """
        p = Path(path)
        if p.is_dir():
            p = _find_tokenizer_file(p)
        elif not p.is_file():
            raise ValueError(f"{path}: no such tokenizer file or directory")
        pair = _GPT2_PAIRS.get(p.name)
        if p.suffix != ".tiktoken" and (pair or p.suffix == ".json"):
            if special_tokens is not None or pattern is not None:
                raise ValueError(f"{p}: special_tokens/pattern apply only to *.tiktoken files (this layout has its own)")
            eos = bpe_io.read_eos_token(p.parent) or ENDOFTEXT
            if pair:
                # This layout has no regex: it is GPT-2's by definition (tokenizer.json records others).
                vocab, merges_txt = p.with_name(pair[0]), p.with_name(pair[1])
                if not (vocab.is_file() and merges_txt.is_file()):
                    raise ValueError(f"{p}: GPT-2's layout needs both {pair[0]} and {pair[1]} in {p.parent}")
                ranks, special, merges = bpe_io.read_vocab_merges(vocab, merges_txt)
                return cls(ranks, special, GPT2_PATTERN, eos_token=eos, name=str(p.parent), merges=merges)
            ranks, special, pat, merges = bpe_io.read_hf_tokenizer_json(p)
            return cls(ranks, special, pat, eos_token=eos, name=str(p), merges=merges)
        ranks = bpe_io.read_tiktoken(p)
        if special_tokens is None:
            special_tokens = {ENDOFTEXT: max(ranks.values()) + 1}
        return cls(ranks, special_tokens, pattern or GPT2_PATTERN, name=p.stem)

    @classmethod
    def from_tiktoken(cls, encoding: tiktoken.Encoding, *, eos_token: str | None = ENDOFTEXT) -> Tokenizer:
        """Wrap an existing ``tiktoken.Encoding``, sharing its Rust core (no second copy)."""
        return cls(encoding._mergeable_ranks, encoding._special_tokens, encoding._pat_str,
                   eos_token=eos_token, name=encoding.name, _encoding=encoding)

    @classmethod
    def gpt2(cls, path: str | os.PathLike) -> Tokenizer:
        """GPT-2's tokenizer from its rank file (``gpt2.tiktoken``; ``<|endoftext|>`` = 50256)."""
        tok = cls.from_file(path)
        if tok.vocab_size != 50257:
            raise ValueError(f"{path}: GPT-2 has 50,256 ranks + <|endoftext|>, this file gives {tok.vocab_size} ids")
        return tok

    # ------------------------------------------------------------------------------------------
    # encoding

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of ``text``. Special tokens' text is plain text unless allowed
        (``allowed_special="all"`` or a set of names such as ``{"<|endoftext|>"}``)."""
        try:
            if not allowed_special:
                return self._core.encode_ordinary(text)
            return self._core.encode(text, self._allowed(allowed_special))
        except UnicodeEncodeError:
            # Lone surrogates (e.g. from JSON "\ud83d") are not UTF-8 encodable: replace them with
            # U+FFFD, as tiktoken does, rather than fail.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encode(text, allowed_special)
        except TypeError:
            if not isinstance(text, str):
                raise TypeError(f"encode expects a str, got {type(text).__name__}") from None
            raise

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = (), num_threads: int | None = None
    ) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel: the Rust core releases the GIL, so a thread
        pool (one per process, ``num_threads`` defaults to the CPU count, at most 8) encodes
        contiguous slices of the batch side by side."""
        texts = texts if isinstance(texts, list) else list(texts)
        n = len(texts)
        threads = min(num_threads or _default_threads(), n)
        if threads <= 1:
            return [self.encode(t, allowed_special) for t in texts]
        # Several slices per thread so one long text does not leave the other threads idle.
        n_chunks = min(n, threads * 4)
        bounds = [n * i // n_chunks for i in range(n_chunks + 1)]
        encode = self.encode

        def run(i: int) -> list[list[int]]:
            return [encode(t, allowed_special) for t in texts[bounds[i] : bounds[i + 1]]]

        out: list[list[int]] = []
        for part in self._executor(threads).map(run, range(n_chunks)):
            out.extend(part)
        return out

    def count(self, text: str, allowed_special: AllowedSpecial = ()) -> int:
        """Number of tokens ``encode`` would return (for prompt budgets and billing)."""
        return len(self.encode(text, allowed_special))

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str] | set[str]:
        if allowed_special == "all":
            return self._special_set
        if isinstance(allowed_special, str):
            raise ValueError(f'allowed_special must be "all" or a set of names, got {allowed_special!r}')
        allowed = allowed_special if isinstance(allowed_special, set | frozenset) else set(allowed_special)
        if not allowed <= self._special_set:
            raise ValueError(
                f"unknown special token(s) {sorted(allowed - self._special_set)}; this tokenizer has "
                f"{sorted(self._special_set)}"
            )
        return allowed

    def _executor(self, threads: int) -> ThreadPoolExecutor:
        # One pool per process and size: a pool inherited through fork() has no live threads.
        with self._pool_lock:
            pid = os.getpid()
            if self._pool is None or self._pool[:2] != (pid, threads):
                if self._pool is not None and self._pool[0] == pid:
                    self._pool[2].shutdown(wait=False)
                self._pool = (pid, threads, ThreadPoolExecutor(threads, thread_name_prefix="lmcore-tok"))
            return self._pool[2]

    # ------------------------------------------------------------------------------------------
    # decoding

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: their bytes joined, decoded as UTF-8 with invalid or incomplete
        sequences replaced by U+FFFD (a cut-off character never raises).
        ``ValueError`` for an id that is not in the vocabulary."""
        try:
            return self._core.decode_bytes(ids).decode("utf-8", "replace")
        except _BAD_ID_ERRORS:  # the slow path: convert or explain
            return self.decode_bytes(ids).decode("utf-8", "replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of ``ids`` (may end mid-character). Lists, tuples, numpy arrays and
        tensors are accepted; ``ValueError`` names the first bad id and its position."""
        try:
            return self._core.decode_bytes(ids)
        except _BAD_ID_ERRORS:
            if not isinstance(ids, list | tuple) and hasattr(ids, "tolist"):  # a tensor or array
                return self.decode_bytes(ids.tolist())
            raise self._bad_ids(ids) from None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (``50256`` -> ``b"<|endoftext|>"``, ``262`` -> ``b" the"``)."""
        try:
            return self._core.decode_single_token_bytes(token_id)
        except _BAD_ID_ERRORS:
            raise self._bad_ids([token_id]) from None

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder: ``push(id) -> str`` as ids arrive, ``flush()`` at the end."""
        return StreamDecoder(self)

    def _bad_ids(self, ids) -> ValueError:
        try:
            items = list(ids)
        except TypeError:
            return ValueError(f"expected a sequence of token ids, got {type(ids).__name__}")
        for pos, i in enumerate(items):
            try:
                self._core.decode_single_token_bytes(i)
            except _BAD_ID_ERRORS:
                what = "not an integer" if not isinstance(i, int) else (
                    "negative" if i < 0 else f"not in the vocabulary (ids are 0..{self.vocab_size - 1})")
                return ValueError(f"token id {i!r} at position {pos} is {what}")
        return ValueError("invalid token ids")

    # ------------------------------------------------------------------------------------------
    # vocabulary

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-text token (``<|endoftext|>``), or None if this vocabulary has none."""
        return self._special.get(self._eos_token) if self._eos_token else None

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name -> id (a copy)."""
        return dict(self._special)

    @property
    def pattern(self) -> str:
        """The pre-tokenizer regex."""
        return self._pattern

    @property
    def ranks(self) -> dict[bytes, int]:
        """Mergeable token bytes -> id/rank (a copy; special tokens excluded)."""
        return dict(self._ranks)

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding:
        """The underlying ``tiktoken.Encoding``, for code that wants tiktoken's own API."""
        return self._encoding

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list in priority order (recovered from the ranks if the file had none)."""
        if self._merges is None:
            self._merges = bpe_io.merges_from_ranks(self._ranks, self.name)
        return list(self._merges)

    def __len__(self) -> int:
        return self.vocab_size

    def __reduce__(self):
        # Picklable (Ray Serve ships deployments' state by pickle): rebuild from the vocabulary,
        # never the thread pool or lock.
        return (_rebuild, (self._ranks, self._special, self._pattern, self._eos_token, self.name, self._merges))

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={len(self._special)}, eos_id={self.eos_id})")

    # ------------------------------------------------------------------------------------------
    # training and saving

    @classmethod
    def train(
        cls,
        texts_or_files: Iterable[str | os.PathLike],
        vocab_size: int,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        *,
        min_frequency: int = 2,
        pattern: str = GPT2_PATTERN,
        eos_token: str | None = ENDOFTEXT,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Learn a new byte-level BPE vocabulary of at most ``vocab_size`` ids (specials included).

        ``texts_or_files`` yields texts (``str``) or file paths (``pathlib.Path``; a plain ``str``
        is always text). Hugging Face ``tokenizers``' BPE trainer does the counting (in Rust); its
        result is converted to ranks and checked like any Hugging Face file. Ids: special tokens
        first (0, 1, ...), then the 256 bytes, then one id per merge in the order learned. A small
        corpus may stop short of ``vocab_size`` (no pair left occurring ``min_frequency`` times).
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or not all(
            isinstance(s, str) and s for s in special_tokens
        ):
            raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
        floor = 256 + len(special_tokens)
        if not isinstance(vocab_size, int) or vocab_size < floor:
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small to train: byte-level BPE needs 256 byte tokens + "
                f"{len(special_tokens)} special token(s) = {floor} ids before its first merge"
            )
        hf = HFTokenizer(models.BPE())
        if pattern == GPT2_PATTERN:
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=show_progress,
        )
        hf.train_from_iterator(_iter_texts(texts_or_files), trainer=trainer)
        return cls.from_hf(hf, eos_token=eos_token, name="trained")

    @classmethod
    def from_hf(cls, hf_tokenizer, *, eos_token: str | None = ENDOFTEXT, name: str = "hf") -> Tokenizer:
        """Convert an in-memory ``tokenizers.Tokenizer`` (byte-level BPE) exactly, or ``ValueError``."""
        import json

        ranks, special, pat, merges = bpe_io.parse_hf_tokenizer_json(json.loads(hf_tokenizer.to_str()), name)
        return cls(ranks, special, pat, eos_token=eos_token, name=name, merges=merges)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the Hugging Face layout into ``directory``: ``tokenizer.json``, ``vocab.json``,
        ``merges.txt`` and ``tokenizer_config.json``. ``Tokenizer.from_file(directory)``,
        ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer`` all read it back."""
        bpe_io.write_hf_layout(
            Path(directory), self._ranks, self._special, self._pattern, self.merges(), self._eos_token
        )


class StreamDecoder:
    """Incremental detokenization for streaming: emit text only once its characters are complete.

    A model emits one id at a time, and an id's bytes may end in the middle of a UTF-8 character
    ("🤗" is 3 GPT-2 tokens). Decoding each id alone would print replacement characters; this
    keeps the incomplete tail until the next id completes it. The concatenation of every ``push``
    result and the final ``flush`` equals ``tokenizer.decode(all_ids)`` exactly, U+FFFD included
    (Python's incremental UTF-8 decoder replaces invalid bytes exactly as the one-shot decoder).
    """

    __slots__ = ("_token_bytes", "_tokenizer", "_utf8")

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._token_bytes = tokenizer._core.decode_single_token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (``""`` while a character is still partial)."""
        try:
            data = self._token_bytes(token_id)
        except _BAD_ID_ERRORS:
            raise self._tokenizer._bad_ids([token_id]) from None
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return what is left (U+FFFD for an incomplete character) and reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# GPT-2's two-file layout under Hugging Face's names and under OpenAI's original ones.
_GPT2_PAIRS = {name: pair for pair in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")) for name in pair}


def _find_tokenizer_file(directory: Path) -> Path:
    for name in ("tokenizer.json", "vocab.json", "encoder.json"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.tiktoken"))
    if len(found) != 1:
        raise ValueError(
            f"{directory}: no tokenizer found (expected tokenizer.json, vocab.json + merges.txt, or one "
            f"*.tiktoken file; found {len(found)} *.tiktoken files)"
        )
    return found[0]


def _rebuild(ranks, special, pattern, eos_token, name, merges) -> Tokenizer:
    return Tokenizer(ranks, special, pattern, eos_token=eos_token, name=name, merges=merges)


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _iter_texts(items: Iterable[str | os.PathLike], block: int = 1 << 20) -> Iterable[str]:
    """Texts as given; files read in ~1 MiB blocks cut only where a line starts with a non-space,
    so whitespace runs (``"\\n\\n    "``) reach the trainer whole."""
    if isinstance(items, str | os.PathLike):
        items = [items]
    for item in items:
        if isinstance(item, str):
            yield item
            continue
        if not isinstance(item, os.PathLike):
            raise ValueError(f"texts_or_files items must be str texts or pathlib.Path files, got {type(item).__name__}")
        try:
            with open(item, encoding="utf-8", errors="replace") as f:
                tail = ""
                while chunk := f.read(block):
                    buf = tail + chunk
                    cut = buf.rfind("\n")
                    while cut >= 0 and (cut + 1 == len(buf) or buf[cut + 1].isspace()):
                        cut = buf.rfind("\n", 0, cut)
                    if cut < 0:  # no safe cut point yet: read on
                        tail = buf
                        continue
                    yield buf[: cut + 1]
                    tail = buf[cut + 1 :]
                if tail:
                    yield tail
        except OSError as e:
            raise ValueError(f"{item}: cannot read training file: {e}") from None
