"""The ``lmstack`` command: a table of subcommands, each a module with ``add_arguments`` and ``run``.

    lmstack serve                 start the local platform (supervised processes)
    lmstack complete "PROMPT"     stream a completion          lmstack models     list served models
    lmstack fewshot ...           few-shot answer              lmstack score ...  rank choices by likelihood
    lmstack tokenize "TEXT"       ids and pieces               lmstack train ...  train a model from scratch
    lmstack inspect "TEXT"        tokens, next-token probabilities, attention (--png), logit lens
    lmstack finetune ...          upload|create|list|get|watch|cancel fine-tune jobs
    lmstack keys create ...       a tenant's API key (printed once; its sha256 goes to the keys file)

Modules are imported only for the subcommand that runs, so ``lmstack tokenize`` does not pay for
torch or Redis imports it does not need. Every ``run`` returns an exit code; errors print one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). ``module.add_arguments(parser)`` and ``module.run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("services.cli.serve", "start the tokenizer, inference and fine-tuning services locally"),
    "complete": ("services.cli.client_cmds:complete", "complete a prompt (streams by default)"),
    "fewshot": ("services.cli.client_cmds:fewshot", "answer a query from few-shot examples (JSONL)"),
    "score": ("services.cli.client_cmds:score", "score choices by their likelihood after a context"),
    "tokenize": ("services.cli.client_cmds:tokenize", "show the token ids and pieces of a text"),
    "models": ("services.cli.client_cmds:models", "list the models the inference service serves"),
    "inspect": ("services.cli.inspect:command", "look inside a model: next-token probabilities, attention, logit lens"),
    "train": ("services.cli.train", "train a tokenizer and a model from scratch on a text file"),
    "finetune": ("services.cli.finetune", "fine-tuning jobs: upload, create, list, get, watch, cancel"),
    "keys": ("services.cli.keys", "API keys for tenants: create (printed once, hash stored), list"),
}


def _load(target: str):
    """``module`` or ``module:attr``: the object that has ``add_arguments`` and ``run``."""
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="Serve and fine-tune GPT-style models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (target, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            _load(target).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    only = command if command in COMMANDS else None
    parser = build_parser(only="" if only is None else only)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_load(COMMANDS[args.command][0]).run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
