"""Train a language model from scratch: text files in, a servable model directory out.

The whole pipeline in one function, :func:`train_from_scratch` (``lmstack train`` calls it):

1. **Tokenizer**: learn a byte-level BPE vocabulary of ``vocab_size`` ids from the same text
   (``Tokenizer.train``), so the model's vocabulary fits its data.
2. **Data**: tokenize every file, join files with ``<|endoftext|>``, cut the stream into
   ``block_size + 1`` windows, hold a seeded ``eval_fraction`` of them out.
3. **Model**: a fresh GPT of the chosen preset shape (``tiny``, ``small``, ``gpt2`` ...), with the
   vocabulary size the tokenizer actually reached, initialised from ``seed``.
4. **Train** with :class:`lmcore.training.trainer.Trainer` under a progress bar (loss, tokens/s).
5. **Save** ``config.json`` + ``model.safetensors`` + the tokenizer + ``training.json`` (how it was
   made, for reproduction): ``lmcore.load_model(out_dir)`` loads it, tokenizer included.

Same files, same arguments, same seed: same model (on the same machine and thread count).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmcore.model import GPT, GPTConfig, save_pretrained
from lmcore.tokenizer import Tokenizer

from .data import TokenBlocks, encode_documents, read_text_files, train_eval_split
from .trainer import TrainConfig, Trainer, TrainEvent


@dataclass
class ScratchResult:
    out_dir: str
    n_files: int
    n_tokens: int  # tokens in the corpus (train + held out)
    n_parameters: int
    vocab_size: int
    steps: int
    train_loss: float | None
    eval_loss: float | None
    seconds: float
    tokens_per_s: float


def collect_files(data: str | Path | list, glob: str = "*.txt") -> list[Path]:
    """Files named directly, plus every file matching ``glob`` under each named directory (sorted)."""
    items = data if isinstance(data, list | tuple) else [data]
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob(glob) if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory")
    if not files:
        raise ValueError(f"no training files found in {[str(i) for i in items]} (pattern {glob!r})")
    return files


def train_from_scratch(
    data_file: str | Path | list,
    out_dir: str | Path,
    preset: str = "tiny",
    vocab_size: int | None = None,
    block_size: int | None = None,
    steps: int = 1000,
    batch_size: int = 16,
    grad_accum_steps: int = 1,
    learning_rate: float = 1e-3,
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    dropout: float = 0.0,
    eval_fraction: float = 0.05,
    eval_interval: int = 100,
    eval_batches: int | None = 20,
    checkpoint_interval: int = 0,
    seed: int = 0,
    glob: str = "*.txt",
    num_threads: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    callback=None,
) -> ScratchResult:
    """Train a tokenizer and a GPT on text files; write a model directory to ``out_dir``.

    ``data_file`` is a file, a directory (every ``glob`` match under it), or a list of those.
    ``vocab_size`` / ``block_size`` default to the preset's. With ``checkpoint_interval`` > 0
    checkpoints go to ``out_dir/checkpoints`` and an interrupted run resumes from them.
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    files = collect_files(data_file, glob)
    base = GPTConfig.from_preset(preset)
    vocab_size = vocab_size or base.vocab_size
    block_size = block_size or base.block_size

    tokenizer = Tokenizer.train(list(files), vocab_size, special_tokens=["<|endoftext|>"])
    tokens = encode_documents(tokenizer, read_text_files(files))
    blocks = TokenBlocks(tokens, block_size)
    train_set, eval_set = train_eval_split(blocks, eval_fraction, seed)

    config = GPTConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, block_size=block_size,
                                   dropout=dropout)
    torch.manual_seed(seed)
    model = GPT(config).to(device)  # initialised on the CPU (same seed, same weights anywhere), then moved
    train_config = TrainConfig(
        max_steps=steps, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
        learning_rate=learning_rate, warmup_steps=warmup_steps, weight_decay=weight_decay,
        eval_interval=eval_interval, eval_batches=eval_batches, checkpoint_interval=checkpoint_interval,
        seed=seed, log_interval=1,
    )
    ckpt_dir = out_dir / "checkpoints" if checkpoint_interval else None

    with _ProgressBar(steps, enabled=progress, title=f"training {preset} ({model.num_parameters():,} params)") \
            as bar:
        def on_event(event: TrainEvent) -> None:
            bar.update(event)
            if callback is not None:
                callback(event)

        trainer = Trainer(model, train_config, train_set, eval_set, checkpoint_dir=ckpt_dir, callback=on_event)
        result = trainer.train()

    model.eval()
    save_pretrained(model, out_dir, tokenizer=tokenizer)
    seconds = time.perf_counter() - t0
    summary = ScratchResult(
        out_dir=str(out_dir), n_files=len(files), n_tokens=len(tokens),
        n_parameters=model.num_parameters(), vocab_size=tokenizer.vocab_size, steps=result.steps,
        train_loss=result.train_loss, eval_loss=result.eval_loss, seconds=round(seconds, 2),
        tokens_per_s=round(result.trained_tokens / max(result.seconds, 1e-9), 1),
    )
    record = {
        "arguments": {
            "data": [str(f) for f in files][:50] + (["..."] if len(files) > 50 else []), "preset": preset,
            "vocab_size": vocab_size, "block_size": block_size, "steps": steps, "batch_size": batch_size,
            "grad_accum_steps": grad_accum_steps, "learning_rate": learning_rate, "warmup_steps": warmup_steps,
            "weight_decay": weight_decay, "dropout": dropout, "eval_fraction": eval_fraction, "seed": seed,
            "glob": glob, "device": device,
        },
        "result": asdict(summary),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return summary


class _ProgressBar:
    """A rich progress bar fed by trainer events: step m/n, loss, eval loss, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool, title: str):
        self.total, self.enabled, self.title = total, enabled, title
        self.progress = None
        self.task = None
        self.eval_loss = "-"

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("eval [magenta]{task.fields[eval]}"),
                TextColumn("[green]{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task(self.title, total=self.total, loss="-", eval="-", tps="-")
        return self

    def update(self, event: TrainEvent) -> None:
        if self.progress is None:
            return
        if event.kind == "step":
            self.progress.update(self.task, completed=event.step, loss=f"{event.loss:.3f}",
                                 tps=f"{event.tokens_per_s:,.0f}")
        elif event.kind == "eval":
            self.progress.update(self.task, eval=f"{event.eval_loss:.3f}")

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
