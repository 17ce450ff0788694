"""Structured output in the engine: JSON schema, regex, grammar and choice constraints.

Every sampled completion under a constraint is checked by an independent judge (``json.loads`` +
``jsonschema``, ``re.fullmatch``, membership), on the shipped ``pycode`` model and on a random
GPT-2-vocabulary model; unconstrained neighbours are token-for-token their solo runs; a constraint
that allows exactly the greedy continuation reproduces it; bad constraints are named before
anything is queued; max_tokens mid-structure ends with "length" and the partial text.
"""

from __future__ import annotations

import copy
import json
import math
import re

import jsonschema
import pytest
import torch

from lmcore import Engine, SamplingParams, load_model
from tests.helpers import ROOT
from tests.helpers.models import gpt2_vocab_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
                           "ok": {"type": "boolean"}},
            "required": ["zip", "ok"], "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
REGEX = r"[A-Z]{2}-[0-9]{3,5}( (alpha|beta))?"
CHOICES = ["yes", "no", "maybe later", "Ünïcödé ✓"]
N = 50


def run_all(engine: Engine, prompts_params) -> dict[str, dict]:
    """Queue everything, step to the end; per request id: text, token ids, finish reason, logprobs."""
    ids = [engine.add_request(p, sp) for p, sp in prompts_params]
    out = {rid: dict(text="", ids=[], reason=None, lp=[]) for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            r = out[o.request_id]
            r["text"] += o.text
            r["ids"] += o.new_token_ids
            r["lp"] += o.logprobs or []
            if o.finished:
                r["reason"] = o.finish_reason
                assert o.error is None, o.error
    return [out[rid] for rid in ids]


def assert_all_follow(kind: str, results) -> None:
    """Every sampled completion ended with its grammar and follows its constraint; not all alike."""
    texts = [r["text"] for r in results]
    assert all(r["reason"] == "stop" for r in results), [(r["reason"], r["text"]) for r in results]
    if kind == "json_schema":
        for t in texts:
            jsonschema.validate(json.loads(t), SCHEMA)
    elif kind == "regex":
        assert all(re.fullmatch(REGEX, t) for t in texts), texts
    else:
        assert set(texts) <= set(CHOICES)
    assert len(set(texts)) > 1  # sampled, not one fixed answer


@pytest.fixture(scope="module")
def pycode():
    return load_model(ROOT / "models" / "pycode")


@pytest.fixture(scope="module", params=["pycode", "gpt2-vocab"])
def served(request, pycode, gpt2_tiktoken_path_module):
    """(model, tokenizer) for each vocabulary: the shipped model, and random weights over GPT-2's."""
    if request.param == "pycode":
        return pycode, pycode.tokenizer
    from tests.helpers import gpt2_tokenizer

    return gpt2_vocab_model(seed=3), gpt2_tokenizer(gpt2_tiktoken_path_module)


@pytest.fixture(scope="module")
def gpt2_tiktoken_path_module(tmp_path_factory):
    import shutil

    from tests.helpers import GPT2_TIKTOKEN

    if not GPT2_TIKTOKEN.exists():
        pytest.skip(f"{GPT2_TIKTOKEN} not found (the GPT-2 vocabulary: set LMSTACK_GPT2_TIKTOKEN)")
    dst = tmp_path_factory.mktemp("gpt2") / "gpt2.tiktoken"
    shutil.copy(GPT2_TIKTOKEN, dst)
    return dst


@pytest.mark.parametrize("kind", ["json_schema", "regex", "choice"])
def test_50_sampled_completions_follow_the_constraint(served, kind):
    model, tok = served
    engine = Engine(model, max_batch_size=N, tokenizer=tok)
    constraint = {"json_schema": dict(json_schema=SCHEMA), "regex": dict(regex=REGEX),
                  "choice": dict(choice=CHOICES)}[kind]
    prompt = tok.encode("data = ")
    results = run_all(engine, [(prompt, SamplingParams(max_tokens=160, temperature=1.0, seed=s, **constraint))
                               for s in range(N)])
    assert_all_follow(kind, results)
    assert engine.constraints.compiles == 1  # one compile, reused by the other 49 requests
    assert not engine.constraints.active  # every matcher released


def test_grammar_and_json_object(pycode):
    engine = Engine(pycode, max_batch_size=8, tokenizer=pycode.tokenizer)
    grammar = 'root ::= "def " name "(" name? "):" \nname ::= [a-z] [a-z_]{0,6}'
    prompt = pycode.tokenizer.encode("# a function\n")
    results = run_all(engine, [(prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=s, grammar=grammar))
                               for s in range(8)])
    for r in results:
        assert r["reason"] == "stop" and re.fullmatch(r"def [a-z][a-z_]{0,6}\(([a-z][a-z_]{0,6})?\):", r["text"])
    results = run_all(engine, [(prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=s, json_object=True))
                               for s in range(8)])
    for r in results:
        if r["reason"] == "stop":  # any JSON may nest past max_tokens; the finished ones parse
            assert isinstance(json.loads(r["text"]), dict)
        else:
            assert r["reason"] == "length" and r["text"].lstrip().startswith("{")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_unconstrained_neighbour_keeps_its_solo_tokens(served, temperature):
    model, tok = served
    prompt = tok.encode("for i in range(")
    plain = SamplingParams(max_tokens=24, temperature=temperature, seed=7, ignore_eos=True)
    solo = run_all(Engine(model, max_batch_size=4, tokenizer=tok), [(prompt, plain)])[0]
    engine = Engine(model, max_batch_size=4, tokenizer=tok)
    mixed = run_all(engine, [(prompt, SamplingParams(max_tokens=24, temperature=temperature, seed=7, regex=REGEX)),
                             (prompt, plain),
                             (tok.encode("x"), SamplingParams(max_tokens=60, temperature=1.0, seed=1, json_schema=SCHEMA))])
    assert mixed[1]["ids"] == solo["ids"]
    assert re.fullmatch(REGEX, mixed[0]["text"]) and mixed[2]["reason"] in ("stop", "length")


def test_constraint_allowing_the_greedy_continuation_reproduces_it(served):
    """The mask only removes tokens: when the greedy tokens are allowed, greedy picks them again, and
    the reported log-probabilities are the model's own (pre-mask), equal to the unconstrained ones."""
    model, tok = served
    prompt = tok.encode("def main():\n")
    free = run_all(Engine(model, tokenizer=tok),
                   [(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3))])[0]
    assert free["text"]
    forced = run_all(Engine(model, tokenizer=tok),
                     [(prompt, SamplingParams(max_tokens=40, temperature=0, logprobs=3, choice=[free["text"]]))])[0]
    assert forced["text"] == free["text"] and forced["reason"] == "stop"
    assert forced["ids"][:12] == free["ids"]
    assert forced["ids"][12:] == [tok.eos_id]  # then the end of text, the only token left
    for a, b in zip(forced["lp"], free["lp"]):
        assert a.token_id == b.token_id and math.isclose(a.logprob, b.logprob, rel_tol=1e-5, abs_tol=1e-6)
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], rel=1e-5, abs=1e-6)


def test_max_tokens_mid_structure_ends_with_length_and_the_partial_text(served):
    model, tok = served
    engine = Engine(model, max_batch_size=8, tokenizer=tok)
    results = run_all(engine, [(tok.encode("x = "), SamplingParams(max_tokens=5, temperature=1.0, seed=s,
                                                                   json_schema=SCHEMA)) for s in range(8)])
    for r in results:
        assert r["reason"] == "length" and len(r["ids"]) == 5
        assert r["text"].startswith('{"name": "') or '{"name": "'.startswith(r["text"])
    assert not engine.constraints.active


def test_stop_strings_apply_inside_a_constraint(pycode):
    tok = pycode.tokenizer
    engine = Engine(pycode, tokenizer=tok)
    r = run_all(engine, [(tok.encode("v = "), SamplingParams(max_tokens=40, temperature=0, regex=r"[0-9]{2}-[0-9]{2}",
                                                             stop=["-"]))])[0]
    assert r["reason"] == "stop" and re.fullmatch(r"[0-9]{2}", r["text"])


def test_lora_adapter_and_prefix_cache_with_constraints(tmp_path, pycode):
    from lmcore.lora import LoRAConfig, apply_lora, save_adapter

    variant = copy.deepcopy(pycode)
    apply_lora(variant, LoRAConfig(rank=4, target_modules=("all",)))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in variant.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    save_adapter(variant, tmp_path / "a", base_model="pycode")
    tok = pycode.tokenizer
    engine = Engine(copy.deepcopy(pycode), max_batch_size=8, tokenizer=tok)
    engine.add_adapter("a", tmp_path / "a")
    prompt = tok.encode("# shared prefix of the prompt, long enough to fill a cached block or two\n" * 2)
    texts = {}
    for wave in ([0, 1], [2, 3, 4, 5]):  # the second wave finds the first's prompt blocks cached
        ids = [engine.add_request(prompt, SamplingParams(max_tokens=120, temperature=1.0, seed=s, json_schema=SCHEMA),
                                  adapter="a" if s % 2 else None) for s in wave]
        texts.update(dict.fromkeys(ids, ""))
        while engine.has_unfinished():
            for o in engine.step():
                texts[o.request_id] += o.text
                assert o.error is None
    for t in texts.values():
        jsonschema.validate(json.loads(t), SCHEMA)
    assert engine.stats()["prefix_cache_hits"] >= 4  # per adapter: the base's and "a"'s blocks


BAD = [
    (dict(json_schema={"type": "strnig"}), "invalid json schema: .*strnig"),
    (dict(json_schema='{"type": '), "json_schema is not valid JSON"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "minimum greater than maximum"),
    (dict(regex="[a-"), "invalid regex: .*Unclosed '\\['"),
    (dict(regex="(?P<n>x)"), "invalid regex"),
    (dict(grammar='root ::= "a" |'), "invalid grammar: .*line 1"),
    (dict(grammar='start ::= "a"'), 'invalid grammar: .*root'),
    (dict(choice=[]), "choice is empty"),
    (dict(choice=["a", ""]), "non-empty"),
    (dict(regex="a", choice=["a"]), "at most one constraint.*regex, choice"),
    (dict(json_object=True, json_schema={"type": "object"}), "at most one constraint"),
]


@pytest.mark.parametrize("kw,message", BAD, ids=[m for _, m in BAD])
def test_bad_constraints_are_named_before_anything_is_queued(pycode, kw, message):
    engine = Engine(pycode, tokenizer=pycode.tokenizer)
    with pytest.raises(ValueError, match=message):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, **kw))
    assert not engine.has_unfinished() and not engine.constraints.active


def test_a_constraint_needs_a_tokenizer(pycode):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Engine(pycode).add_request([1, 2], SamplingParams(regex="a+"))


def test_aborted_and_failed_requests_release_their_matchers(pycode):
    engine = Engine(pycode, tokenizer=pycode.tokenizer)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=30, regex="[a-z]+"))
    engine.step()
    assert engine.constraints.active
    engine.abort(rid)
    assert not engine.constraints.active


# --- speculative decoding under a constraint ------------------------------------------------------
# A prompt that repeats records of SCHEMA's shape: prompt lookup finds the keys and values it copies.
RECORDS = [dict(name="ann", age=31, role="admin", tags=["a", "bc"], address=dict(zip=1234, ok=True)),
           dict(name="bob", age=42, role="user", tags=["bc"], address=dict(zip=4321, ok=False))]
SPEC_PROMPT = "".join(f"row = {json.dumps(r)}\n" for r in RECORDS) + "row = "


def tiny_draft(vocab_size: int):
    """A cheap draft model over the target's vocabulary (random: many of its proposals are refused
    by the grammar and cut)."""
    from tests.helpers.models import random_model

    return random_model(5, n_layer=1, n_head=1, n_embd=16, block_size=256, vocab_size=vocab_size)


def spec_requests(tok, **kw):
    """(prompt, params) of constrained greedy requests; max_tokens from 1 up lands inside proposals."""
    prompt = tok.encode(SPEC_PROMPT)
    greedy = dict(temperature=0.0, **kw)
    out = [(prompt, SamplingParams(max_tokens=m, json_schema=SCHEMA, **greedy)) for m in range(1, 13)]
    out.append((prompt, SamplingParams(max_tokens=100, json_schema=SCHEMA, **greedy)))
    out.append((tok.encode("id = AB-123 beta\nid = CD-4567\nid = AB-123"),
                SamplingParams(max_tokens=30, regex=REGEX, **greedy)))
    out.append((tok.encode("answer: maybe later. answer: maybe"), SamplingParams(max_tokens=30, choice=CHOICES, **greedy)))
    return out


@pytest.mark.parametrize("proposer", ["prompt_lookup", "draft"])
def test_speculative_constrained_greedy_is_plain_constrained_greedy(served, proposer):
    """Proposals cut at the first refused token, verify rows masked per position, acceptance on the
    masked logits: token for token the constrained greedy output without speculation, at every
    max_tokens (landing inside a proposal too), and every matcher released at the end."""
    model, tok = served
    requests = spec_requests(tok)
    draft = None
    if proposer == "draft":  # the target itself: its proposals are the unconstrained greedy tokens, cut by the grammar
        draft = copy.deepcopy(model)
        requests = [requests[i] for i in (2, 6, 12, 13, 14)]  # its plain forward per proposed token is slow here
    plain = run_all(Engine(model, max_batch_size=16, tokenizer=tok), requests)
    engine = Engine(model, max_batch_size=16, tokenizer=tok, speculative_tokens=4, draft_model=draft,
                    draft_min_confidence=0.0)
    spec = run_all(engine, [(p, SamplingParams(**sp.model_dump(exclude_unset=True), speculation=proposer))
                            for p, sp in requests])
    for a, b in zip(spec, plain):
        assert (a["ids"], a["text"], a["reason"]) == (b["ids"], b["text"], b["reason"])
    assert all(r["reason"] == "length" for r, (_, sp) in zip(spec, requests) if sp.max_tokens < 13)
    jsonschema.validate(json.loads(spec[-3]["text"]), SCHEMA)
    s = engine.stats()
    assert s["spec_decode_steps"] > 0 and 0 < s["spec_accepted_tokens"] <= s["spec_proposed_tokens"]
    assert not engine.constraints.active


@pytest.mark.parametrize("kind", ["json_schema", "regex", "choice"])
def test_50_sampled_speculative_constrained_completions_follow_the_constraint(served, kind):
    """Sampled speculation under each kind of constraint: every completion is valid. Prompt lookup
    (point proposals) for all; on the shipped model every fifth request uses a draft model whose
    sampled proposals the grammar often cuts (the cut position draws from the residual)."""
    model, tok = served
    with_draft = model.config.vocab_size < 10_000  # a draft's plain forward over 50k logits per token is too slow for CI
    engine = Engine(model, max_batch_size=N, tokenizer=tok, speculative_tokens=3,
                    draft_model=tiny_draft(model.config.vocab_size) if with_draft else None,
                    draft_min_confidence=0.0)
    constraint, prompt = {"json_schema": (dict(json_schema=SCHEMA), SPEC_PROMPT),
                          "regex": (dict(regex=REGEX), "id = AB-123 beta\nid = CD-4567\nid = "),
                          "choice": (dict(choice=CHOICES), "|".join(CHOICES * 2) + "|")}[kind]
    results = run_all(engine, [(tok.encode(prompt), SamplingParams(
        max_tokens=140, temperature=1.0, seed=s, speculation="draft" if with_draft and s % 5 == 0 else "prompt_lookup",
        **constraint)) for s in range(N)])
    assert_all_follow(kind, results)
    assert engine.stats()["spec_proposed_tokens"] > 0
    assert not engine.constraints.active


@pytest.mark.parametrize("rule", ["residual at the cut", "plain draw at the cut"])
def test_a_cut_sampled_draft_keeps_the_masked_distribution(rule):
    """verify() on grammar-masked logits with draft-model proposals cut at the first refused token:
    the first emitted token is distributed as the masked target p (chi-square over 6,000 draws).
    The cut position draws from the residual max(p - q, 0); drawing it from p instead (the
    tempting shortcut) is biased, and the test shows it."""
    import random

    from lmcore.engine.speculative import _probs, verify

    torch.manual_seed(0)
    V, k = 12, 2
    allowed = [set(range(0, 6)), set(range(2, 10)), set(range(V))]
    masked = torch.randn(k + 1, V) * 1.5
    for j, a in enumerate(allowed):
        masked[j, [t for t in range(V) if t not in a]] = float("-inf")
    params = SamplingParams(temperature=0.9)
    p = _probs(masked, params)
    q = torch.softmax(torch.randn(k, V), -1)  # the draft knows nothing of the grammar
    rng = random.Random(2)
    gen = torch.Generator().manual_seed(3)
    first = torch.zeros(V)
    for _ in range(6000):
        draft = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(k)]
        n = next((j for j, t in enumerate(draft) if t not in allowed[j]), k)
        dq = q[:n + 1] if n < k and rule == "residual at the cut" else q[:n]
        out = verify(masked, draft[:n], dq, params, rng)
        assert all(t in allowed[j] for j, t in enumerate(out))
        first[out[0]] += 1
    expected = p[0] * first.sum()
    keep = expected > 5
    stat = float(((first[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    cells = int(keep.sum())
    assert (stat < cells + 6 * cells ** 0.5) == (rule == "residual at the cut"), stat


def test_abort_mid_speculation_releases_the_matcher(pycode):
    tok = pycode.tokenizer
    engine = Engine(pycode, tokenizer=tok)
    rid = engine.add_request(tok.encode(SPEC_PROMPT), SamplingParams(max_tokens=90, temperature=0.0, json_schema=SCHEMA,
                                                                     speculation="prompt_lookup"))
    while engine.stats()["spec_decode_steps"] == 0:
        engine.step()
    assert rid in engine.constraints
    assert engine.abort(rid)
    assert rid not in engine.constraints and not engine.constraints.active
    # the engine goes on: the same request again gives the same (valid) text as without speculation
    again = run_all(engine, [(tok.encode(SPEC_PROMPT), SamplingParams(max_tokens=90, temperature=0.0,
                                                                      json_schema=SCHEMA, speculation="prompt_lookup"))])
    plain = run_all(Engine(pycode, tokenizer=tok), [(tok.encode(SPEC_PROMPT),
                                                     SamplingParams(max_tokens=90, temperature=0.0, json_schema=SCHEMA))])
    assert again[0]["ids"] == plain[0]["ids"] and again[0]["reason"] == "stop"
