"""Client subcommands: ``complete``, ``fewshot``, ``score``, ``tokenize``, ``models`` (gRPC via services.client).

Each command is an ``add_arguments``/``run`` pair. Server errors print as one line,
``lmstack complete: INVALID_ARGUMENT: temperature must be >= 0``, and exit with code 1; an
unreachable server says which address it tried and how to start one. Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INFERENCE_ADDR = os.environ.get("LMSTACK_INFERENCE_ADDR", "127.0.0.1:50051")
TOKENIZER_ADDR = os.environ.get("LMSTACK_TOKENIZER_ADDR", "127.0.0.1:50052")


@dataclass(frozen=True)
class Command:
    add_arguments: Callable
    run: Callable


def _connection_args(p, default_addr: str, what: str) -> None:
    p.add_argument("--addr", default=default_addr, help=f"{what} service address (default {default_addr})")
    p.add_argument("--api-key", default=os.environ.get("LMSTACK_API_KEY"),
                   help="API key sent as 'authorization: Bearer KEY' (default $LMSTACK_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up (default 120)")
    p.add_argument("--model", default="", help="model name (default: the server's default model)")
    p.add_argument("--application", default=os.environ.get("LMSTACK_APPLICATION") or None,
                   help="behind Ray Serve's gRPC proxy: the Serve application (lmstack in deploy/serve.yaml); "
                        "sets Ray's routing metadata from --model (default $LMSTACK_APPLICATION)")
    tls_args(p)


def tls_args(p, default=lambda value: value) -> None:
    """--tls-ca, --tls-cert, --tls-key and --tenant (each also an ``LMSTACK_*`` variable)."""
    env = os.environ.get
    p.add_argument("--tls-ca", default=default(env("LMSTACK_TLS_CA", "")),
                   help="CA (PEM) that signed the server's certificate: connect with TLS (default $LMSTACK_TLS_CA)")
    p.add_argument("--tls-cert", default=default(env("LMSTACK_TLS_CLIENT_CERT", "")),
                   help="client certificate (PEM) for a server that requires mTLS ($LMSTACK_TLS_CLIENT_CERT)")
    p.add_argument("--tls-key", default=default(env("LMSTACK_TLS_CLIENT_KEY", "")),
                   help="client private key (PEM) for mTLS ($LMSTACK_TLS_CLIENT_KEY)")
    p.add_argument("--tenant", default=default(env("LMSTACK_TENANT", "")),
                   help="with an admin key: act for this tenant ($LMSTACK_TENANT)")


def tls_kwargs(args) -> dict:
    return dict(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, tenant=args.tenant)


def _sampling_args(p, max_tokens: int = 64) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the server's)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--stop", action="append", default=None, type=unescape,
                   help="stop string (repeatable); \\n, \\t, \\r and \\\\ are unescaped, so --stop '\\n\\n' "
                        "stops at a blank line")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed on a command line -> the characters. A shell passes
    ``"\\n"`` as a backslash and an n; the stop string a user means is a newline. Nothing else changes
    (no ``unicode_escape``: it would mangle non-ASCII text)."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _fail(command: str, message: str) -> int:
    print(f"lmstack {command}: {message}", file=sys.stderr)
    return 1


def _rpc(command: str, addr: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; turn gRPC errors into one readable line and exit code 1."""
    import grpc

    try:
        return fn()
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return _fail(command, f"cannot reach the service at {addr} ({e.details()}); "
                                  "is `lmstack serve` running? (--addr to point elsewhere)")
        return _fail(command, f"{code.name}: {e.details()}")
    except BrokenPipeError:
        return 0


def _client(args):
    from services.client import Client

    return Client(args.addr, api_key=args.api_key, timeout=args.timeout, application=args.application,
                  **tls_kwargs(args))


# --- complete ----------------------------------------------------------------------------------------
def _complete_args(p) -> None:
    p.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    _connection_args(p, INFERENCE_ADDR, "inference")
    _sampling_args(p)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they are generated (default; --no-stream waits for the whole text)")
    p.add_argument("--verbose", "-v", action="store_true", help="print finish reason and token counts to stderr")
    _constraint_args(p)


def _constraint_args(p) -> None:
    g = p.add_argument_group("structured output (at most one)")
    ex = g.add_mutually_exclusive_group()
    ex.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under this JSON Schema file")
    ex.add_argument("--json-object", action="store_true", help="the output is any valid JSON object")
    ex.add_argument("--regex", metavar="RE", help="the whole output matches this regular expression")
    ex.add_argument("--grammar", metavar="FILE", help="the output follows this EBNF/GBNF grammar file (rule root)")
    ex.add_argument("--choice", action="append", metavar="TEXT",
                    help="the output is exactly one of the --choice strings (repeatable)")


def _constraint(args) -> dict:
    """The constraint options as sampling fields; ValueError naming an unreadable file."""
    out: dict = {}
    for flag, field in (("json_schema", "json_schema"), ("grammar", "grammar")):
        path = getattr(args, flag)
        if path is not None:
            try:
                out[field] = Path(path).read_text()
            except OSError as e:
                raise ValueError(f"--{flag.replace('_', '-')} {path}: {e.strerror}") from None
    if args.json_object:
        out["json_object"] = True
    if args.regex is not None:
        out["regex"] = args.regex
    if args.choice:
        out["choice"] = args.choice
    return out


def _complete(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        constraint = _constraint(args)
    except ValueError as e:
        return _fail("complete", str(e))

    def go() -> int:
        with _client(args) as c:
            if args.stream:
                finish, usage = "", None
                for chunk in c.complete_stream(prompt, model=args.model, **_sampling(args), **constraint):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    if chunk.finish_reason:
                        finish, usage = chunk.finish_reason, chunk.usage
                print()
            else:
                r = c.complete(prompt, model=args.model, **_sampling(args), **constraint)
                print(r.text)
                finish, usage = r.finish_reason, r.usage
        if args.verbose and usage is not None:
            print(f"[finish_reason={finish} prompt_tokens={usage.prompt_tokens} "
                  f"completion_tokens={usage.completion_tokens}]", file=sys.stderr)
        return 0

    return _rpc("complete", args.addr, go)


# --- fewshot -----------------------------------------------------------------------------------------
def _fewshot_args(p) -> None:
    p.add_argument("--examples", required=True, metavar="FILE.jsonl",
                   help='one {"input": ..., "output": ...} object per line')
    p.add_argument("--query", required=True, help="the new input to answer")
    p.add_argument("--instruction", default="", help="a sentence describing the task")
    p.add_argument("--style", default="", help="prompt style, e.g. qa or io (default: the server's)")
    _connection_args(p, INFERENCE_ADDR, "inference")
    _sampling_args(p, max_tokens=32)
    p.add_argument("--verbose", "-v", action="store_true", help="print the rendered prompt and counts to stderr")


def read_examples(path: str) -> list[tuple[str, str]]:
    """``(input, output)`` pairs from a JSONL file; ``ValueError`` naming the line for a bad one."""
    examples = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("input"), str) or not isinstance(obj.get("output"), str):
            raise ValueError(f'{path}:{n}: expected {{"input": "...", "output": "..."}}')
        examples.append((obj["input"], obj["output"]))
    return examples


def _fewshot(args) -> int:
    try:
        examples = read_examples(args.examples)
    except ValueError as e:
        return _fail("fewshot", str(e))

    def go() -> int:
        with _client(args) as c:
            r = c.few_shot(args.query, examples, instruction=args.instruction, style=args.style,
                           model=args.model, **_sampling(args))
        print(r.text)
        if args.verbose:
            print(f"--- prompt ---\n{r.prompt}\n--- examples_used={r.examples_used} "
                  f"prompt_tokens={r.prompt_tokens} finish_reason={r.finish_reason}", file=sys.stderr)
        return 0

    return _rpc("fewshot", args.addr, go)


# --- score -------------------------------------------------------------------------------------------
def _score_args(p) -> None:
    p.add_argument("--context", required=True, help="the text before each choice")
    p.add_argument("--choice", action="append", required=True, help="a continuation to score (repeat: 2 or more)")
    _connection_args(p, INFERENCE_ADDR, "inference")


def _score(args) -> int:
    def go() -> int:
        with _client(args) as c:
            r = c.score(args.context, args.choice, model=args.model)
        width = max(len(repr(ch.text)) for ch in r.choices)
        for i, ch in enumerate(r.choices):
            mark = "*" if i == r.best else " "
            print(f"{mark} {ch.text!r:<{width}}  logprob {ch.logprob:9.4f}  tokens {ch.num_tokens}")
        return 0

    return _rpc("score", args.addr, go)


# --- tokenize ----------------------------------------------------------------------------------------
def _tokenize_args(p) -> None:
    p.add_argument("text", help="the text ('-' reads it from stdin)")
    _connection_args(p, TOKENIZER_ADDR, "tokenizer")
    p.add_argument("--allow-special", action="store_true", help="encode <|endoftext|> etc. as special tokens")
    p.add_argument("--ids-only", action="store_true", help="print only the ids, space-separated")


def _tokenize(args) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text

    def go() -> int:
        with _client(args) as c:
            ids = c.encode(text, model=args.model, allow_special=args.allow_special)
            print(" ".join(map(str, ids)))
            if not args.ids_only:
                # One piece per token; a piece ending mid-character shows U+FFFD (bytes, not text).
                for i in ids:
                    print(f"{i:>8}  {c.decode([i], model=args.model)!r}")
                print(f"{len(ids)} tokens, {len(text)} characters")
        return 0

    return _rpc("tokenize", args.addr, go)


# --- models ------------------------------------------------------------------------------------------
def _models_args(p) -> None:
    _connection_args(p, INFERENCE_ADDR, "inference")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--wait", action="store_true",
                   help="while the service is still loading its models, wait (up to --timeout) instead of exiting 1")
    p.add_argument("--delete", metavar="NAME", default=None,
                   help="delete this fine-tuned model (yours; an admin: any): unloaded, removed from the store")


def _models(args) -> int:
    def go() -> int:
        with _client(args) as c:
            if args.delete:
                done = c.delete_model(args.delete)
                print(f"deleted {done.name}" + (" (unloaded)" if done.unloaded else ""))
                return 0
            # A server that listens but has not loaded its models has nothing to list yet: say so.
            # (Ray's proxy has no grpc.health service: behind it, ListModels answers once the app is up.)
            if args.application:
                pass
            elif args.wait:
                try:
                    c.wait_ready(timeout=args.timeout)
                except TimeoutError:
                    return _fail("models", f"the inference service at {args.addr} was still loading its models "
                                           f"after {args.timeout:.0f}s")
            else:
                status = c.health_status(timeout=min(args.timeout, 5.0))
                if status != "SERVING":
                    return _fail("models", f"the inference service at {args.addr} is still loading its models "
                                           f"(health {status}); retry in a moment, or pass --wait")
            models = c.list_models()
        if args.json:
            from google.protobuf.json_format import MessageToDict

            print(json.dumps([MessageToDict(m, preserving_proto_field_name=True) for m in models], indent=2))
            return 0
        print(f"{'name':<40} {'context':>7} {'vocab':>7} {'parameters':>12}  source")
        for m in models:
            star = "*" if m.is_default else " "
            params = f"{m.parameters:>12,}" if m.parameters else f"{'(unloaded)':>12}"
            owner = f" ({m.tenant})" if m.tenant else ""
            print(f"{star}{m.name:<39} {m.context_length:>7} {m.vocab_size:>7} {params}  {m.source}{owner}")
        return 0

    return _rpc("models", args.addr, go)


complete = Command(_complete_args, _complete)
fewshot = Command(_fewshot_args, _fewshot)
score = Command(_score_args, _score)
tokenize = Command(_tokenize_args, _tokenize)
models = Command(_models_args, _models)
