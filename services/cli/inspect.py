"""``lmstack inspect "TEXT"``: look inside a served model (the inference service's Inspect RPC).

Prints each token with the token that came next, the probability and rank the model gave it, its
surprise in bits and the top-k alternatives; ``--logit-lens`` adds the per-layer table (what each
depth would predict); ``--png FILE`` draws attention heatmaps (every layer x head, or one head
large with ``--layer L --head H``), a strip of per-token surprise and, with ``--logit-lens``, the
lens (``services.cli.inspect_plot``, matplotlib's Agg backend: no display needed).
"""

from __future__ import annotations

import sys

from .client_cmds import INFERENCE_ADDR, Command, _client, _connection_args, _fail, _rpc


def label(text: str, width: int = 0) -> str:
    """A token as a short, visible label: spaces as ``␣``, newlines and tabs escaped."""
    out = text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if width and len(out) > width:
        out = out[: width - 1] + "…"
    return out


def _add_arguments(p) -> None:
    p.add_argument("text", help="the text to look at ('-' reads it from stdin)")
    _connection_args(p, INFERENCE_ADDR, "inference")
    p.add_argument("--top-k", type=int, default=5, help="next-token alternatives per position (1-50, default 5)")
    p.add_argument("--logit-lens", action="store_true", help="print (and with --png draw) the per-layer top tokens")
    p.add_argument("--png", metavar="FILE", help="draw attention heatmaps and per-token surprise into FILE")
    p.add_argument("--layer", type=int, action="append", default=None,
                   help="attention of this layer only (repeatable; default all)")
    p.add_argument("--head", type=int, action="append", default=None,
                   help="attention of this head only (repeatable; default all); --layer L --head H draws one head large")
    p.add_argument("--size", metavar="WxH", default=None, help="PNG size in pixels (default: fits the grid)")
    p.add_argument("--allow-special", action="store_true", help="encode <|endoftext|> etc. as special tokens")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")


def parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {value!r}: expected WIDTHxHEIGHT in pixels, e.g. 1200x900") from None
    if not (64 <= w <= 8000 and 64 <= h <= 8000):
        raise ValueError(f"--size {value!r}: each side must be 64..8000 pixels")
    return w, h


def print_positions(resp, out=sys.stdout) -> None:
    n = len(resp.tokens)
    print(f"{resp.model}: {n} tokens, {resp.n_layer} layers x {resp.n_head} heads", file=out)
    print(f"{'pos':>4}  {'token':<14} {'next':<14} {'p(next)':>8} {'rank':>6} {'surprise':>9}  "
          f"top {len(resp.positions[0].top) if resp.positions else 0} next tokens", file=out)
    for t, (tok, pos) in enumerate(zip(resp.tokens, resp.positions)):
        alts = "  ".join(f"{label(a.token, 12)} {a.prob:.3f}" for a in pos.top)
        if pos.has_next:
            nxt = label(resp.tokens[t + 1].text, 14)
            print(f"{t:>4}  {label(tok.text, 14):<14} {nxt:<14} {pos.next_prob:>8.4f} {pos.next_rank:>6} "
                  f"{pos.surprise_bits:>6.2f} b  {alts}", file=out)
        else:
            print(f"{t:>4}  {label(tok.text, 14):<14} {'-':<14} {'':>8} {'':>6} {'':>9}  {alts}", file=out)
    known = [p.surprise_bits for p in resp.positions if p.has_next]
    if known:
        print(f"mean surprise {sum(known) / len(known):.2f} bits per token "
              f"(perplexity {2 ** (sum(known) / len(known)):.1f})", file=out)


def print_lens(resp, out=sys.stdout) -> None:
    """Rows: positions; columns: depth (emb = the embeddings, L1.. = after that many blocks)."""
    depths = [("emb" if row.layer == 0 else f"L{row.layer}") for row in resp.logit_lens]
    print("logit lens: the top next token at each depth (the last column is the model's output)", file=out)
    print(f"{'pos':>4}  {'token':<12} " + " ".join(f"{d:<18}" for d in depths), file=out)
    for t, tok in enumerate(resp.tokens):
        cells = [f"{label(row.tokens[t], 11):<11} {row.probs[t]:.3f}" for row in resp.logit_lens]
        print(f"{t:>4}  {label(tok.text, 12):<12} " + " ".join(f"{c:<18}" for c in cells), file=out)


def _run(args) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    try:
        size = parse_size(args.size)
    except ValueError as e:
        return _fail("inspect", str(e))
    attention = args.png is not None

    def go() -> int:
        with _client(args) as c:
            resp = c.inspect(text, model=args.model, top_k=args.top_k, attention=attention,
                             logit_lens=args.logit_lens, layers=args.layer or (), heads=args.head or (),
                             allow_special=args.allow_special)
        if args.json:
            import json

            from google.protobuf.json_format import MessageToDict

            print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=1))
        else:
            print_positions(resp)
            if args.logit_lens:
                print()
                print_lens(resp)
        if args.png:
            from .inspect_plot import render_png

            w, h = render_png(resp, args.png, size=size, lens=args.logit_lens)
            print(f"wrote {args.png} ({w}x{h} px)", file=sys.stderr)
        return 0

    return _rpc("inspect", args.addr, go)


command = Command(_add_arguments, _run)
