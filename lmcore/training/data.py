"""Training data: token sequences, the targets a language model learns from, and seeded batching.

A language model learns to predict token ``t+1`` from tokens ``0..t``. So every training example
is one token sequence ``s`` read twice: the input is ``s[:-1]`` and the target is ``s[1:]`` (the
same tokens shifted left by one). Two kinds of data produce such sequences:

* **Plain text** (pretraining, :class:`TokenBlocks`): every document is tokenized, documents are
  joined with ``<|endoftext|>``, and the stream is cut into windows of ``block_size + 1`` tokens
  that overlap by one token, so every token is predicted exactly once.
* **Records** (fine-tuning, :class:`RecordDataset`): ``{"prompt": ..., "completion": ...}`` lines
  of JSONL. The model should learn to *write* the completion, not the prompt, so the targets of
  prompt positions are set to ``IGNORE_INDEX`` (-100, which ``cross_entropy`` skips) and only the
  completion tokens (plus a closing ``<|endoftext|>`` that teaches the model to stop) carry loss.
  ``{"text": ...}`` records train on every token.

Batches are drawn by :class:`BatchSampler`: each epoch is a permutation seeded by ``(seed,
epoch)``, so the order never depends on anything but those two numbers, and the sampler's whole
state is two integers (``epoch``, ``position``): what a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # target value F.cross_entropy(ignore_index=-100) leaves out of the loss


class DatasetError(ValueError):
    """A bad training record; ``line`` is its 1-based line number in the JSONL file (0: the file)."""

    def __init__(self, line: int, message: str):
        self.line = line
        self.reason = message
        super().__init__(f"line {line}: {message}" if line else message)


@dataclass
class Batch:
    """One micro-batch: ``idx`` and ``targets`` are (B, T); ``n_tokens`` counts real (unpadded) inputs."""

    idx: torch.Tensor  # (B, T) int64 token ids
    targets: torch.Tensor  # (B, T) int64 next-token ids, IGNORE_INDEX where no loss is taken
    n_tokens: int


# --- plain text -------------------------------------------------------------------------------


class TokenBlocks:
    """A token stream cut into ``block_size + 1`` windows with stride ``block_size``."""

    def __init__(self, tokens: torch.Tensor | list[int], block_size: int):
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() != 1:
            raise ValueError("TokenBlocks expects a 1-D token stream")
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"the text is {len(tokens)} tokens; at least block_size + 1 = {block_size + 1} are needed "
                "for one training example"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.n_blocks = (len(tokens) - 1) // block_size

    def __len__(self) -> int:
        return self.n_blocks

    def collate(self, indices: list[int]) -> Batch:
        T = self.block_size
        rows = torch.stack([self.tokens[i * T : i * T + T + 1] for i in indices])  # (B, T+1)
        return Batch(idx=rows[:, :-1], targets=rows[:, 1:], n_tokens=rows.shape[0] * T)

    def subset(self, indices: list[int]) -> _BlockSubset:
        return _BlockSubset(self, indices)


class _BlockSubset:
    def __init__(self, parent: TokenBlocks, indices: list[int]):
        self.parent, self.indices = parent, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def collate(self, indices: list[int]) -> Batch:
        return self.parent.collate([self.indices[i] for i in indices])


def read_text_files(paths: Iterable[str | Path]) -> list[str]:
    """The contents of every file (UTF-8; undecodable bytes replaced), one string per file."""
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]


def encode_documents(tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """Tokenize documents into one stream, each followed by ``<|endoftext|>`` (GPT-2's separator)."""
    ids: list[int] = []
    eos = tokenizer.eos_id
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --- JSONL records ----------------------------------------------------------------------------


def parse_record(line: str | bytes, lineno: int) -> dict | None:
    """Parse and check one JSONL line; ``None`` for a blank line. Raises :class:`DatasetError`."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DatasetError(lineno, f"expected a JSON object, got {type(obj).__name__}")
    if "text" in obj and "completion" not in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DatasetError(lineno, 'field "text" must be a non-empty string')
        return {"text": obj["text"]}
    for field in ("prompt", "completion"):
        if field not in obj:
            raise DatasetError(lineno, f'missing field "{field}" (records are {{"prompt", "completion"}} '
                                       'or {"text"})')
        if not isinstance(obj[field], str):
            raise DatasetError(lineno, f'field "{field}" must be a string, got {type(obj[field]).__name__}')
    if not obj["completion"]:
        raise DatasetError(lineno, 'field "completion" is empty: there is nothing to learn')
    return {"prompt": obj["prompt"], "completion": obj["completion"]}


def read_records(lines: Iterable[str | bytes]) -> list[tuple[int, dict]]:
    """Every record of a JSONL file as ``(line number, record)``; raises on the first bad line."""
    records = []
    for lineno, line in enumerate(lines, start=1):
        rec = parse_record(line, lineno)
        if rec is not None:
            records.append((lineno, rec))
    if not records:
        raise DatasetError(0, "the dataset is empty (no records)")
    return records


def tokenize_record(tokenizer, record: dict) -> tuple[list[int], int]:
    """Token ids of a record (ending with ``<|endoftext|>``) and how many leading ids are prompt."""
    if "text" in record:
        return tokenizer.encode(record["text"]) + [tokenizer.eos_id], 0
    prompt = tokenizer.encode(record["prompt"])
    completion = tokenizer.encode(record["completion"])
    return prompt + completion + [tokenizer.eos_id], len(prompt)


def check_record(tokenizer, record: dict, block_size: int, lineno: int) -> tuple[list[int], int]:
    """:func:`tokenize_record`, checked against the model's context: the one owner of that rule,
    shared by :class:`RecordDataset` and the fine-tuning API's upload validation (which must
    reject at upload exactly what training would reject later). Raises :class:`DatasetError`."""
    ids, n_prompt = tokenize_record(tokenizer, record)
    if len(ids) - 1 > block_size:
        raise DatasetError(lineno, f"record is {len(ids) - 1} tokens (with <|endoftext|>), longer "
                                   f"than the model's context of {block_size}")
    if len(ids) < 2:
        raise DatasetError(lineno, "record has no tokens to learn from")
    return ids, n_prompt


class RecordDataset:
    """Tokenized ``{"prompt", "completion"}`` / ``{"text"}`` records; loss only on what is learned.

    Every sequence must fit the model's context: ``len(ids) - 1 <= block_size`` (the last token is
    only a target). A longer record is an error naming its line, never silently truncated.
    """

    def __init__(self, sequences: list[tuple[list[int], int]], pad_id: int):
        self.sequences = sequences  # (token ids, number of prompt tokens)
        self.pad_id = pad_id

    @classmethod
    def from_records(cls, records: list[tuple[int, dict]], tokenizer, block_size: int) -> RecordDataset:
        sequences = [check_record(tokenizer, rec, block_size, lineno) for lineno, rec in records]
        return cls(sequences, pad_id=tokenizer.eos_id)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer, block_size: int) -> RecordDataset:
        with open(path, "rb") as f:
            return cls.from_records(read_records(f), tokenizer, block_size)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) - 1 for ids, _ in self.sequences)

    def collate(self, indices: list[int]) -> Batch:
        seqs = [self.sequences[i] for i in indices]
        T = max(len(ids) for ids, _ in seqs) - 1
        idx = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (B, T)
        targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        n_tokens = 0
        for row, (ids, n_prompt) in enumerate(seqs):
            t = torch.tensor(ids, dtype=torch.long)
            n = len(ids) - 1
            idx[row, :n] = t[:-1]
            targets[row, :n] = t[1:]
            # targets[j] is token j+1: a prompt token when j+1 < n_prompt; those carry no loss.
            targets[row, : max(n_prompt - 1, 0)] = IGNORE_INDEX
            n_tokens += n
        return Batch(idx=idx, targets=targets, n_tokens=n_tokens)

    def subset(self, indices: list[int]) -> RecordDataset:
        return RecordDataset([self.sequences[i] for i in indices], self.pad_id)


def eval_count(n: int, eval_fraction: float, max_eval: int | None = None) -> int:
    """How many of ``n`` examples :func:`train_eval_split` holds out (0: no held-out split)."""
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    return 0 if n_eval >= n else n_eval


def train_eval_split(dataset, eval_fraction: float, seed: int, max_eval: int | None = None):
    """Split a dataset into (train, eval) with a seeded permutation; eval gets at least one example.

    With ``eval_fraction == 0`` (or a one-example dataset) there is no held-out split: ``eval`` is None.
    """
    n = len(dataset)
    n_eval = eval_count(n, eval_fraction, max_eval)
    if n_eval == 0:
        return dataset, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return dataset.subset(sorted(perm[n_eval:])), dataset.subset(sorted(perm[:n_eval]))


# --- batching ---------------------------------------------------------------------------------


class BatchSampler:
    """Endless seeded batches of example indices; the state is ``(epoch, position)``.

    Epoch ``e`` visits every example once in the order ``randperm(n, seed=hash(seed, e))``; the last
    batch of an epoch may be short (no example is dropped). ``state_dict`` / ``load_state_dict``
    let a checkpoint resume at the exact next batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise ValueError("cannot batch an empty dataset")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._perm: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def _order(self) -> list[int]:
        if self._perm is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
        return self._perm

    def next_indices(self) -> list[int]:
        order = self._order()
        batch = order[self.position : self.position + self.batch_size]
        self.position += len(batch)
        if self.position >= self.n:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None


def iterate_batches(dataset, batch_size: int) -> Iterator[Batch]:
    """Every example once, in order (for evaluation)."""
    for start in range(0, len(dataset), batch_size):
        yield dataset.collate(list(range(start, min(start + batch_size, len(dataset)))))
