"""Train a language model from scratch: text files in, a servable model directory out.

The whole pipeline in one function, :func:`train_from_scratch` (``lmstack train`` calls it):

1. **Tokenizer**: learn a byte-level BPE vocabulary of ``vocab_size`` ids from the same text
   (``Tokenizer.train``), so the model's vocabulary fits its data; or reuse a given one (a draft
   model for speculative decoding must share its target's tokenizer exactly).
2. **Data**: tokenize every file, join files with ``<|endoftext|>``, cut the stream into
   ``block_size + 1`` windows, hold a seeded ``eval_fraction`` of them out.
3. **Model**: a fresh GPT of the given ``GPTConfig`` (or preset: ``tiny``, ``small``, ``gpt2`` ...),
   with the vocabulary size the tokenizer actually reached, initialised from the seed.
4. **Train** with :class:`lmcore.training.trainer.Trainer` under the given ``TrainConfig``; progress
   goes to the caller's callback (``lmstack train`` draws a progress bar from it).
5. **Save** ``config.json`` + ``model.safetensors`` + the tokenizer + ``training.json`` (how it was
   made, for reproduction): ``lmcore.load_model(out_dir)`` loads it, tokenizer included.

Same files, same configs, same seed: same model (on the same machine and thread count).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lmcore._io import atomic_write
from lmcore.model import GPT, PRESETS, GPTConfig, save_pretrained
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


def preset_name(config: GPTConfig) -> str | None:
    """The preset whose shape ``config`` has (``tiny``, ``small``, ``gpt2`` ...), None for a custom one."""
    shape = ("n_layer", "n_head", "n_embd")
    return next((name for name, p in PRESETS.items() if all(p[k] == getattr(config, k) for k in shape)), None)


def train_from_scratch(
    data: str | Path | list,
    out_dir: str | Path,
    model_config: GPTConfig | str,
    train_config: TrainConfig,
    *,
    eval_fraction: float = 0.05,
    glob: str = "*.txt",
    device: str = "cpu",
    num_threads: int | None = None,
    callback: Callable[[TrainEvent], None] | None = None,
    tokenizer: Tokenizer | str | Path | None = None,
) -> ScratchResult:
    """Train a tokenizer and a GPT on text files; write a model directory to ``out_dir``.

    ``data`` is a file, a directory (every ``glob`` match under it), or a list of those.
    ``model_config`` is the model's shape (a ``GPTConfig``, or a preset name for the preset's
    defaults); its ``vocab_size`` is the size of the BPE vocabulary to learn (the model gets the
    size the tokenizer actually reached), its ``block_size`` the context and its ``dropout`` the
    training dropout. ``train_config`` holds every training knob (steps, batch, learning rate,
    evaluation, checkpoints, seed: one source of truth, the same class the fine-tuning worker
    uses); its ``seed`` also fixes the held-out split and the initial weights. With
    ``checkpoint_interval`` > 0 checkpoints go to ``out_dir/checkpoints`` and an interrupted run
    resumes from them. ``callback`` receives the trainer's events (``lmstack train`` draws its
    progress bar from them; lmcore prints nothing). ``tokenizer`` (a :class:`Tokenizer`, or a
    tokenizer file or model directory for ``Tokenizer.from_file``) is used as it is instead of
    training one; ``model_config.vocab_size`` is then ignored (the model gets the tokenizer's size).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    files = collect_files(data, glob)
    requested = GPTConfig.from_preset(model_config) if isinstance(model_config, str) else model_config
    preset = model_config if isinstance(model_config, str) else preset_name(model_config)
    seed = train_config.seed

    tokenizer_source = None if tokenizer is None or isinstance(tokenizer, Tokenizer) else str(tokenizer)
    if tokenizer is None:
        tokenizer = Tokenizer.train(list(files), requested.vocab_size, special_tokens=["<|endoftext|>"])
    elif tokenizer_source is not None:
        tokenizer = Tokenizer.from_file(tokenizer_source)
    tokens = encode_documents(tokenizer, read_text_files(files))
    blocks = TokenBlocks(tokens, requested.block_size)
    train_set, eval_set = train_eval_split(blocks, eval_fraction, seed)

    config = replace(requested, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = GPT(config).to(device)  # initialised on the CPU (same seed, same weights anywhere), then moved
    ckpt_dir = out_dir / "checkpoints" if train_config.checkpoint_interval else None
    resumed_tokens = []  # tokens a resumed run had trained before this process: not this run's speed

    def on_event(event: TrainEvent) -> None:
        if event.kind == "start":
            resumed_tokens.append(event.trained_tokens)
        if callback is not None:
            callback(event)

    trainer = Trainer(model, train_config, train_set, eval_set, checkpoint_dir=ckpt_dir, callback=on_event)
    result = trainer.train()
    tokens_this_run = result.trained_tokens - (resumed_tokens[0] if resumed_tokens else 0)

    model.eval()
    save_pretrained(model, out_dir, tokenizer=tokenizer)
    seconds = time.perf_counter() - t0
    summary = ScratchResult(
        out_dir=str(out_dir), n_files=len(files), n_tokens=len(tokens),
        n_parameters=model.num_parameters(), vocab_size=tokenizer.vocab_size, steps=result.steps,
        train_loss=result.train_loss, eval_loss=result.eval_loss, seconds=round(seconds, 2),
        tokens_per_s=round(tokens_this_run / result.seconds, 1) if tokens_this_run and result.seconds > 0 else 0.0,
    )
    tc = train_config
    record = {
        "arguments": {
            "data": [str(f) for f in files][:50] + (["..."] if len(files) > 50 else []), "preset": preset,
            "vocab_size": tokenizer.vocab_size if tokenizer_source else requested.vocab_size,
            "tokenizer": tokenizer_source, "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "block_size": requested.block_size, "steps": result.total_steps,
            "batch_size": tc.batch_size, "grad_accum_steps": tc.grad_accum_steps, "learning_rate": tc.learning_rate,
            "warmup_steps": tc.warmup_steps, "weight_decay": tc.weight_decay, "dropout": requested.dropout,
            "eval_fraction": eval_fraction, "seed": seed, "glob": glob, "device": device,
        },
        "result": asdict(summary),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    atomic_write(out_dir / "training.json", json.dumps(record, indent=2) + "\n")
    return summary
