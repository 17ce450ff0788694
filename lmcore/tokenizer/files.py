"""Byte-level BPE vocabularies on disk: tiktoken rank files and Hugging Face layouts, both ways.

The in-memory form used everywhere in lmcore is tiktoken's: ``ranks``, a dict from token bytes to
token id, where the id doubles as the merge priority (lower merges first), plus a dict of special
tokens (``"<|endoftext|>" -> 50256``) and the pre-tokenizer regex. Three file layouts describe it:

* **tiktoken** (``*.tiktoken``): one ``base64(token_bytes) rank`` per line. Compact and exact, but it
  carries neither the special tokens nor the regex.
* **GPT-2's original** (``vocab.json`` + ``merges.txt``) and **Hugging Face** ``tokenizer.json``:
  tokens are written as *strings* through GPT-2's byte-to-unicode table (see ``bytes_to_unicode``),
  and the merges are listed explicitly, in priority order, as pairs ``"Ġ t"``.

Going from a merge list to ranks is exact only when the two algorithms cannot disagree, which
``check_merges`` verifies: ids must grow with merge order (tiktoken merges by id, Hugging Face by
list position), and for each merged token the listed pair must be the one tiktoken's rank-based
algorithm itself ends with when it builds that token. A layout that breaks this is refused with a
``ValueError`` naming the token, rather than silently tokenizing differently.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from lmcore._io import MERGES_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_JSON_FILE, VOCAB_FILE, atomic_write

# GPT-2's pre-tokenizer, in tiktoken's spelling. OpenAI's original was
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# the possessive quantifiers (++) and the \s++$ branch split text identically, only faster.
# Why split at all: BPE never merges across these chunks, so " dog" can become one token but
# "dog." never does: words, numbers, punctuation and whitespace runs stay apart.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from the 256 byte values to 256 printable unicode characters.

    Vocabulary files are JSON/text, and a token is an arbitrary byte string (half a UTF-8
    character, a control byte, a space). GPT-2's encoder therefore spells every byte as a visible
    character: the 188 printable Latin-1 bytes stand for themselves, and the 68 others (controls,
    space, soft hyphen, ...) are shifted to ``chr(256 + n)``. That is why the space (byte 32)
    shows up as ``Ġ`` (U+0120) and the newline (byte 10) as ``Ċ`` in GPT-2's ``vocab.json``:
    ``"Ġthe"`` is the four bytes ``b" the"``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_to_str(token: bytes) -> str:
    """Token bytes as GPT-2 writes them in vocab files (``b" the"`` -> ``"Ġthe"``)."""
    return "".join(BYTE_TO_CHAR[b] for b in token)


def str_to_token(s: str, source: str) -> bytes:
    """The inverse of ``token_to_str``; a character outside the table means the file is not byte-level."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(
            f"{source}: token {s!r} contains {e.args[0]!r}, which is not in GPT-2's byte-to-unicode "
            "alphabet: not a byte-level BPE vocabulary"
        ) from None


# ----------------------------------------------------------------------------------------------
# tiktoken rank files


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """Parse a ``*.tiktoken`` rank file (``base64 rank`` per line) with line-numbered errors."""
    ranks: dict[bytes, int] = {}
    seen_ids: dict[int, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError("expected 'base64_token rank'")
                token = base64.b64decode(fields[0], validate=True)
                rank = int(fields[1])
                if rank < 0 or not token:
                    raise ValueError("negative rank or empty token")
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}:{lineno}: corrupt tiktoken rank file ({e}): {line[:80]!r}") from None
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} listed twice")
            if rank in seen_ids:
                raise ValueError(f"{path}:{lineno}: rank {rank} already used on line {seen_ids[rank]}")
            ranks[token] = rank
            seen_ids[rank] = lineno
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken rank file")
    return ranks


def validate_vocab(ranks: dict[bytes, int], special: dict[str, int], source: str) -> None:
    """Checks tiktoken's core relies on (it would panic or mis-encode otherwise)."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{source}: byte-level BPE needs all 256 single-byte tokens, {len(missing)} missing "
            f"(first: {bytes(missing[:1])!r}); some text would be unencodable"
        )
    if len(set(ranks.values())) != len(ranks) or min(ranks.values()) < 0:
        raise ValueError(f"{source}: token ids must be distinct non-negative integers")
    for name, i in special.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source}: special token names must be non-empty strings, got {name!r}")
        if not isinstance(i, int) or i < 0:
            raise ValueError(f"{source}: special token {name!r} has invalid id {i!r}")
    ids = set(ranks.values())
    clash = [n for n, i in special.items() if i in ids]
    if clash or len(set(special.values())) != len(special):
        raise ValueError(f"{source}: special token id(s) collide with other tokens: {clash or sorted(special)}")


# ----------------------------------------------------------------------------------------------
# merges <-> ranks


def bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Run tiktoken's BPE on ``token`` using only tokens with id < ``below``.

    Start from single bytes; repeatedly join the adjacent pair whose concatenation has the lowest
    id (the leftmost one on a tie); stop when no adjacent pair forms a token. For a token built by
    a merge ``(a, b)`` this returns ``[a, b]``: the two pieces its last merge joined.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_id, best_i = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], below)
            if r < best_id:
                best_id, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int], source: str = "vocabulary") -> list[tuple[bytes, bytes]]:
    """Recover the merge list (in priority order) that a rank table encodes.

    Every multi-byte token is the join of the two pieces ``bpe_parts`` finds below its rank. A token
    that BPE cannot build from two pieces has no Hugging Face spelling: ``ValueError``.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
        if len(token) == 1:
            continue
        parts = bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(
                f"{source}: token {token!r} (id {rank}) is not the merge of two lower-ranked tokens "
                f"(BPE stops at {len(parts)} pieces), so it has no exact merges.txt / tokenizer.json form"
            )
        merges.append((parts[0], parts[1]))
    return merges


def check_merges(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], source: str) -> None:
    """Check that tiktoken's rank-based BPE over ``ranks`` reproduces this merge list exactly.

    Hugging Face's BPE applies the listed merges in list order; tiktoken joins whichever adjacent
    pair forms the lowest-id token. They agree on every input when (1) result ids never decrease
    along the list, (2) the merges giving one token are listed together, and (3) among them is the
    pair tiktoken itself ends with when it builds that token from its bytes (``bpe_parts``):
    then tiktoken only ever joins listed pairs, in the same order. (GPT-2's files list one merge
    per token; converters such as transformers' ``TikTokenConverter`` list every split.)
    """
    done: set[bytes] = set()
    prev_id, prev = -1, b""
    group: list[tuple[bytes, bytes]] = []

    def close_group() -> None:
        token = prev
        parts = bpe_parts(token, ranks, ranks[token])
        if tuple(parts) not in group:
            raise ValueError(
                f"{source}: rank-based BPE builds {token!r} (id {ranks[token]}) from {parts!r}, which is not "
                f"among its listed merges {group[:3]!r}; cannot convert exactly"
            )
        done.add(token)

    for a, b in merges:
        token = a + b
        rank = ranks[token]
        if token != prev:
            if group:
                close_group()
            if token in done:
                raise ValueError(f"{source}: merges giving {token!r} are not listed together; cannot convert exactly")
            if rank <= prev_id:
                raise ValueError(
                    f"{source}: merge {a!r} + {b!r} -> id {rank} is listed after the merge giving id {prev_id} "
                    f"({prev!r}): ids must grow with merge order for an exact conversion to ranks"
                )
            group = []
        group.append((a, b))
        prev_id, prev = rank, token
    if group:
        close_group()
    unreachable = [t for t in ranks if len(t) > 1 and t not in done]
    if unreachable:
        raise ValueError(
            f"{source}: token {unreachable[0]!r} (id {ranks[unreachable[0]]}) is in the vocabulary but no "
            f"merge produces it ({len(unreachable)} such); cannot convert exactly"
        )


# ----------------------------------------------------------------------------------------------
# Hugging Face layouts -> (ranks, special, pattern, merges)


def _pairs(raw_merges: list, source: str) -> list[tuple[str, str]]:
    out = []
    for m in raw_merges:
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise ValueError(f"{source}: malformed merge {m!r} (expected 'a b' or [a, b])")
        out.append((pair[0], pair[1]))
    return out


def convert_hf(
    vocab: dict, raw_merges: list, source: str, added: dict[str, int] | None = None,
    unreachable_are_special: bool = False,
) -> tuple[dict[bytes, int], dict[str, int], list[tuple[bytes, bytes]]]:
    """Hugging Face ``vocab`` + ``merges`` (byte-level strings) -> tiktoken ranks, special tokens, merges.

    ``added`` lists tokenizer.json's special added tokens. GPT-2's ``vocab.json`` layout has no such
    list (``unreachable_are_special``): a vocabulary entry that is neither a byte nor a merge result
    (``<|endoftext|>``) can only ever be produced as a special token, so it becomes one.
    """
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{source}: vocabulary must be a non-empty JSON object of token -> id")
    for s, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{source}: token {s!r} has invalid id {i!r}")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{source}: two tokens share an id")
    added = dict(added or {})
    for s, i in added.items():
        if s in vocab and vocab[s] != i:
            raise ValueError(f"{source}: special token {s!r} has id {i} but the vocabulary says {vocab[s]}")
    pairs = _pairs(raw_merges, source)
    results = set()
    for a, b in pairs:
        for s in (a, b, a + b):
            if s not in vocab:
                raise ValueError(f"{source}: merge {a!r} {b!r} refers to {s!r}, which is not in the vocabulary")
        results.add(a + b)
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for s, i in vocab.items():
        if s in added:
            continue
        is_byte = len(s) == 1 and s in CHAR_TO_BYTE
        if not is_byte and s not in results:
            if not unreachable_are_special:
                str_to_token(s, source)  # a clearer message first if it is not even byte-level
                raise ValueError(
                    f"{source}: token {s!r} (id {i}) is neither a byte nor a merge result nor a special "
                    "token: BPE can never produce it; cannot convert exactly"
                )
            special[s] = i  # GPT-2's vocab.json: <|endoftext|> is such an entry
            continue
        ranks[str_to_token(s, source)] = i
    special.update(added)
    validate_vocab(ranks, special, source)
    merges = [(str_to_token(a, source), str_to_token(b, source)) for a, b in pairs]
    check_merges(ranks, merges, source)
    return ranks, special, merges


def _pattern_from_pre_tokenizer(pre: dict | None, source: str) -> str:
    def byte_level(p: dict, regex: bool) -> bool:
        return (
            p.get("type") == "ByteLevel"
            and not p.get("add_prefix_space", False)
            and bool(p.get("use_regex", True)) == regex
        )

    if isinstance(pre, dict) and byte_level(pre, True):
        return GPT2_PATTERN
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and isinstance(steps[0].get("pattern"), dict)
            and "Regex" in steps[0]["pattern"]
            and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert", False)
            and byte_level(steps[1], False)
        ):
            return steps[0]["pattern"]["Regex"]
    raise ValueError(
        f"{source}: unsupported pre_tokenizer {json.dumps(pre)[:200]}; lmcore converts exactly only "
        "ByteLevel(add_prefix_space=false) or Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)]"
    )


def read_hf_tokenizer_json(path: Path) -> tuple[dict[bytes, int], dict[str, int], str, list]:
    """Read a byte-level BPE ``tokenizer.json``; refuse anything that would not tokenize identically."""
    return parse_hf_tokenizer_json(_read_json(path), str(path))


def parse_hf_tokenizer_json(obj: dict, source: str) -> tuple[dict[bytes, int], dict[str, int], str, list]:
    """The checks and conversion of ``read_hf_tokenizer_json`` on an already parsed JSON object."""
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise ValueError(f"{source}: not a BPE tokenizer.json (model type {model and model.get('type')!r})")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{source}: model.{key}={model[key]!r} is not byte-level BPE; cannot convert exactly")
    if model.get("byte_fallback"):
        raise ValueError(f"{source}: byte_fallback BPE (SentencePiece style) is not byte-level BPE")
    if obj.get("normalizer") is not None:
        raise ValueError(f"{source}: a normalizer ({obj['normalizer'].get('type')}) is not supported; "
                         "lmcore tokenizes raw text like GPT-2")
    decoder = obj.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise ValueError(f"{source}: decoder {decoder.get('type')!r} is not ByteLevel")
    pattern = _pattern_from_pre_tokenizer(obj.get("pre_tokenizer"), source)
    added: dict[str, int] = {}
    for t in obj.get("added_tokens") or []:
        if not t.get("special", False):
            raise ValueError(
                f"{source}: added token {t.get('content')!r} is not special; Hugging Face matches such tokens "
                "before BPE, which lmcore does not reproduce"
            )
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise ValueError(f"{source}: special token {t.get('content')!r} uses lstrip/rstrip/single_word")
        added[t["content"]] = t["id"]
    ranks, special, merges = convert_hf(model["vocab"], model.get("merges") or [], source, added)
    return ranks, special, pattern, merges


def read_vocab_merges(vocab_path: Path, merges_path: Path) -> tuple[dict[bytes, int], dict[str, int], list]:
    """Read GPT-2's original layout: ``vocab.json`` (token -> id) and ``merges.txt`` (one pair a line)."""
    vocab = _read_json(vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{merges_path}: cannot read merges file: {e}") from None
    raw = [ln for ln in lines if ln and not ln.startswith("#version")]
    return convert_hf(vocab, raw, f"{vocab_path} + {merges_path.name}", unreachable_are_special=True)


def read_eos_token(directory: Path) -> str | None:
    """``eos_token`` from a ``tokenizer_config.json`` beside the vocabulary, if there is one."""
    path = directory / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    eos = _read_json(path).get("eos_token")
    if isinstance(eos, dict):  # transformers' serialized AddedToken
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file (truncated or corrupt?): {e}") from None


# ----------------------------------------------------------------------------------------------
# writing the Hugging Face layout


def write_hf_layout(
    directory: Path,
    ranks: dict[bytes, int],
    special: dict[str, int],
    pattern: str,
    merges: list[tuple[bytes, bytes]],
    eos_token: str | None,
) -> None:
    """Write ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``.

    ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer`` load the result, and
    produce the same ids as tiktoken over ``ranks``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token_to_str(t): i for t, i in sorted(ranks.items(), key=lambda x: x[1])}
    vocab.update(special)
    vocab = dict(sorted(vocab.items(), key=lambda x: x[1]))
    merge_strs = [f"{token_to_str(a)} {token_to_str(b)}" for a, b in merges]  # byte-level never holds " "
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    if pattern == GPT2_PATTERN:
        pre = dict(byte_level)
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False},
        ]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in sorted(special.items(), key=lambda x: x[1])
        ],
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merge_strs},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_prefix_space": False}
    if eos_token is not None:
        config |= {"eos_token": eos_token, "bos_token": eos_token, "unk_token": eos_token}
    atomic_write(directory / TOKENIZER_JSON_FILE, json.dumps(tokenizer_json, ensure_ascii=False).encode())
    atomic_write(directory / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False).encode())
    atomic_write(directory / MERGES_FILE, ("#version: 0.2\n" + "\n".join(merge_strs) + "\n").encode())
    atomic_write(directory / TOKENIZER_CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
