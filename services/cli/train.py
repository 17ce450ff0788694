"""``lmstack train``: train a tokenizer and a GPT from scratch on text files (no services needed).

    lmstack train --data corpus.txt --preset tiny --out models/mine --steps 2000
    lmstack train --data /usr/lib/python3.11 --glob '*.py' --preset small --out models/stdlib
    lmstack train --data ... --tokenizer models/pycode --n-layer 2 --n-embd 128 --out models/draft

A non-empty ``--out`` is refused unless it is an earlier resumable run (``--overwrite`` replaces it);
``$LMSTACK_MAX_STEPS`` caps ``--steps``.

Shows a progress bar (loss, held-out loss, tokens/s) and writes a model directory that
``lmstack serve --model NAME=DIR`` and ``lmcore.load_model(DIR)`` load, tokenizer included.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def add_arguments(p) -> None:
    from lmcore.model import PRESETS

    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text file(s), or directories searched recursively for --glob")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    p.add_argument("--glob", default="*.txt", help="file pattern inside --data directories (default: *.txt)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--block-size", type=int, default=None, help="context length (default: the preset's)")
    p.add_argument("--n-layer", type=int, default=None, help="transformer blocks (default: the preset's)")
    p.add_argument("--n-head", type=int, default=None, help="attention heads (default: the preset's)")
    p.add_argument("--n-embd", type=int, default=None, help="model width (default: the preset's)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="reuse this tokenizer (a model directory or tokenizer file) instead of training one: "
                        "a draft model must share its target's tokenizer; excludes --vocab-size")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch (default: 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of the data (default: 0.05)")
    p.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (default: 100)")
    p.add_argument("--checkpoint-interval", type=int, default=0,
                   help="checkpoint every N steps into OUT/checkpoints; a rerun resumes (default: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it holds something other than this command's resumable run")


MAX_STEPS_ENV = "LMSTACK_MAX_STEPS"  # caps --steps (the README test sets it so its examples run in seconds)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write over a non-empty ``--out`` that is not a resumable run of ``lmstack train``
    (one with ``checkpoints/``): a typo must not replace a model (the shipped one included).
    ``--overwrite`` empties it first."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if overwrite:
        shutil.rmtree(out)
        return
    if (out / "checkpoints").is_dir():
        return  # an earlier run with --checkpoint-interval: rerunning resumes it
    raise ValueError(f"--out {out} already holds files ({', '.join(sorted(p.name for p in out.iterdir())[:4])}) "
                     "and is not a resumable lmstack train run; choose another directory or pass --overwrite")


def configs(args):
    """The ``GPTConfig`` and ``TrainConfig`` the flags describe (``ValueError`` names a bad one)."""
    from lmcore.model import GPTConfig
    from lmcore.training import TrainConfig

    if args.tokenizer is not None and args.vocab_size is not None:
        raise ValueError("--vocab-size and --tokenizer exclude each other: the vocabulary is the tokenizer's")
    flags = (("vocab_size", args.vocab_size), ("block_size", args.block_size), ("n_layer", args.n_layer),
             ("n_head", args.n_head), ("n_embd", args.n_embd))
    shape = {k: v for k, v in flags if v is not None}
    model_config = GPTConfig.from_preset(args.preset, dropout=args.dropout, **shape)
    steps = args.steps
    cap = os.environ.get(MAX_STEPS_ENV)
    if cap:
        steps = min(steps, int(cap))
    train_config = TrainConfig(
        max_steps=steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum, learning_rate=args.lr,
        warmup_steps=args.warmup, weight_decay=args.weight_decay, eval_interval=args.eval_interval,
        eval_batches=20, checkpoint_interval=args.checkpoint_interval, seed=args.seed,
        log_interval=1,  # every step feeds the progress bar
    )
    return model_config, train_config


def run(args) -> int:
    from lmcore.training import train_from_scratch

    try:
        check_out_dir(Path(args.out), args.overwrite)
        model_config, train_config = configs(args)
        with ProgressBar(enabled=not args.no_progress, title=f"training {args.preset}") as bar:
            result = train_from_scratch(
                args.data, args.out, model_config, train_config, eval_fraction=args.eval_fraction,
                glob=args.glob, device=args.device, num_threads=args.threads, callback=bar.update,
                tokenizer=args.tokenizer,
            )
    except (ValueError, OSError) as e:
        print(f"lmstack train: {e}", file=sys.stderr)
        return 1
    eval_loss = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "n/a"
    print(f"wrote {result.out_dir}: {result.n_parameters:,} parameters, vocab {result.vocab_size}, "
          f"{result.n_tokens:,} corpus tokens, {result.steps} steps in {result.seconds:.1f}s "
          f"({result.tokens_per_s:,.0f} tok/s), train loss {result.train_loss:.4f}, held-out loss {eval_loss}")
    return 0


class ProgressBar:
    """A rich progress bar fed by trainer events: step m/n, loss, eval loss, tokens/s, ETA.

    It lives here, not in lmcore, so the library prints nothing and needs no terminal package:
    ``train_from_scratch`` hands its events to a callback, and this is the CLI's. The bar is
    drawn at the ``start`` event, which carries the run's length (a resumed run starts part-way)
    and the parameter count for the title.
    """

    def __init__(self, enabled: bool, title: str):
        self.enabled, self.title = enabled, title
        self.progress = None
        self.task = None

    def __enter__(self) -> ProgressBar:
        return self

    def update(self, event) -> None:
        if not self.enabled:
            return
        if event.kind == "start":
            self._start(event)
        elif self.progress is None:
            return
        elif event.kind == "step":
            self.progress.update(self.task, completed=event.step, loss=f"{event.loss:.3f}",
                                 tps=f"{event.tokens_per_s:,.0f}")
        elif event.kind == "eval":
            self.progress.update(self.task, eval=f"{event.eval_loss:.3f}")

    def _start(self, event) -> None:
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
        self.task = self.progress.add_task(f"{self.title} ({event.parameters:,} params)", total=event.total_steps,
                                           completed=event.step, loss="-", eval="-", tps="-")

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
