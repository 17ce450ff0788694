"""LoRA adapters in the model store share their base's engine and batches (S-LoRA, LoRAX).

A real inference server serves a tiny base model and a model store holding two LoRA adapters on it
(real adapter directories written by ``lmcore.lora.save_adapter``). Checked over real channels:
the adapters get no engine of their own (they are in the base engine's bank), requests for the base
and both adapters in flight together run in the same batches and give exactly the tokens each gives
alone and that ``lmcore.generate`` gives on ``load_adapter_model(base, adapter)``; Score and
FewShot go through the adapter too; an adapter published after startup is served on the next
request; adapters whose base is not served, and merged fine-tunes, keep engines of their own.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.client import Client
from services.config import InferenceSettings
from services.inference.__main__ import setup
from tests.helpers import gpt2_tokenizer
from tests.helpers.models import save_tiny_model
from tests.helpers.servers import ServerThread

SQL, POEM, LATE = "ft:tiny:sql:aaa111", "ft:tiny:poem:bbb222", "ft:tiny:late:ccc333"
PROMPTS = ["Once upon a time", "SELECT name FROM", "Roses are red,", "def fib(n):"]
ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def publish_adapter(store, name: str, base_path, base_model: str, seed: int, rank: int, targets) -> None:
    """Train-free stand-in for a LoRA job: random non-zero B, saved and renamed into the store."""
    from lmcore import load_model
    from lmcore.lora import LoRAConfig, apply_lora, save_adapter

    torch.manual_seed(seed)
    model = apply_lora(load_model(base_path), LoRAConfig(rank=rank, alpha=2.0 * rank, target_modules=targets))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0.0, 0.5)  # B starts at zero; make the adapter change the outputs
    tmp = store / f".incoming-{name}"
    save_adapter(model, tmp, base_model=base_model)
    os.rename(tmp, store / name)  # atomic publish, like a fine-tuning job


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_models):
    store = tmp_path_factory.mktemp("adapter-store")
    publish_adapter(store, SQL, tiny_models["tiny"], "tiny", seed=1, rank=4, targets=("attn.c_attn",))
    publish_adapter(store, POEM, tiny_models["tiny"], "tiny", seed=2, rank=2, targets=ALL)
    return store


@pytest.fixture(scope="module")
def server(tiny_models, store):
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(store), max_batch_size=16,
                                 port=0)
    s = ServerThread(settings, "inference", setup).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def base(tiny_models):
    from lmcore import load_model

    return load_model(tiny_models["tiny"])


def served(server, name: str):
    return server.server.state.registry.lookup(name).obj


def reference(base, store, name, prompt: str, max_tokens: int, merge: bool = False) -> list[int]:
    """``lmcore.generate`` on the base alone (name None) or on base + adapter as its own model."""
    from lmcore import SamplingParams, generate
    from lmcore.lora import load_adapter_model

    model = base if name is None else load_adapter_model(base, store / name, merge=merge)
    ids = base.tokenizer.encode(prompt)
    out = generate(model, [ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                   tokenizer=base.tokenizer)[0]
    return list(out.token_ids)


def test_adapters_are_listed_and_share_the_base_engine(client, server):
    info = {m.name: m for m in client.list_models()}
    assert set(info) == {"tiny", SQL, POEM}
    for name in (SQL, POEM):
        assert info[name].base_model == "tiny" and info[name].source == "store"
        assert (info[name].context_length, info[name].vocab_size) == (info["tiny"].context_length,
                                                                     info["tiny"].vocab_size)
        assert info[name].parameters > info["tiny"].parameters  # base + the adapter's A and B
    tiny, sql, poem = served(server, "tiny"), served(server, SQL), served(server, POEM)
    assert sql.engine is tiny.engine and poem.engine is tiny.engine  # no engine of their own
    assert sql.async_engine is tiny.async_engine and poem.async_engine is tiny.async_engine
    assert tiny.engine.adapters() == [POEM, SQL]  # store entries load in name order
    for name in (SQL, POEM):  # the count is the adapter's tensors as loaded: A (r, in) + B (out, r)
        assert info[name].parameters == info["tiny"].parameters + tiny.engine.adapter_parameters(name)
    cfg = tiny.model.config  # SQL: rank 4 on c_attn (C -> 3C); POEM: rank 2 on all four projections
    assert tiny.engine.adapter_parameters(SQL) == cfg.n_layer * 4 * (cfg.n_embd + 3 * cfg.n_embd)
    assert tiny.engine.adapter_parameters(POEM) == cfg.n_layer * 2 * 16 * cfg.n_embd


def test_concurrent_base_and_adapters_batch_together_and_match_solo(client, server, base, store):
    n_tokens = 40
    models = ["tiny", SQL, POEM]
    solo = {(m, p): list(client.complete(p, model=m, max_tokens=n_tokens, temperature=0, ignore_eos=True).token_ids)
            for m in models for p in PROMPTS}
    # the service equals lmcore.generate on the base, and on base + adapter as a model of its own
    for p in PROMPTS:
        assert solo[("tiny", p)] == reference(base, store, None, p, n_tokens), p
        for m in (SQL, POEM):
            assert solo[(m, p)] == reference(base, store, m, p, n_tokens), (m, p)
    assert len({tuple(solo[(m, PROMPTS[0])]) for m in models}) == 3  # the adapters change the outputs
    # merged into the weights (W + BA): the same greedy tokens up to float rounding of the merge
    merged = reference(base, store, POEM, PROMPTS[1], 12, merge=True)
    assert merged == solo[(POEM, PROMPTS[1])][:12]

    engine = served(server, "tiny").engine
    steps_before = engine.stats()["steps"]
    calls = {(m, p): client.complete_stream(p, model=m, max_tokens=n_tokens, temperature=0, ignore_eos=True)
             for m in models for p in PROMPTS}
    firsts = {key: next(call) for key, call in calls.items()}  # all 12 are mid-generation now
    running = {m: engine.load(m if m != "tiny" else None)[0] for m in models}
    own = running["tiny"] - running[SQL] - running[POEM]  # the base's own requests
    assert running[SQL] > 0 and running[POEM] > 0 and own > 0, running  # one batch, three models
    assert engine.num_unfinished() >= 9

    def rest(key):
        chunks = [firsts[key], *calls[key]]
        return [t for c in chunks for t in c.token_ids]

    with ThreadPoolExecutor(len(calls)) as pool:
        together = dict(zip(calls, pool.map(rest, calls)))
    for key in calls:
        assert together[key] == solo[key], key
    # 12 requests x 40 tokens in far fewer steps than 480: they shared steps
    assert engine.stats()["steps"] - steps_before < len(calls) * n_tokens / 4
    assert not engine.has_unfinished()


def test_score_and_few_shot_through_an_adapter(client, base, store):
    from lmcore import FewShotPrompt, SamplingParams, generate
    from lmcore.lora import load_adapter_model
    from lmcore.tasks import score

    model = load_adapter_model(base, store / SQL)
    tok = base.tokenizer
    choices = [" blue", " green and yellow"]
    got = client.score("The sky is", choices, model=SQL)
    ref = score(model, tok.encode("The sky is"), [tok.encode(c) for c in choices])
    plain = score(base, tok.encode("The sky is"), [tok.encode(c) for c in choices])
    for g, r, b in zip(got.choices, ref, plain):
        assert g.logprob == pytest.approx(float(r.logprob), abs=1e-4)
        assert abs(float(r.logprob) - float(b.logprob)) > 1e-3  # the adapter, not the base, was scored
    assert client.score("The sky is", choices, model="tiny").choices[0].logprob == pytest.approx(
        float(plain[0].logprob), abs=1e-4)

    examples = [("dog", "chien"), ("cat", "chat")]
    got = client.few_shot("water", examples, style="qa", model=POEM, max_tokens=8, temperature=0)
    rendered = FewShotPrompt("", examples, style="qa").render("water", tok, base.config.block_size - 8)
    stop = [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop)
    ref = generate(load_adapter_model(base, store / POEM), [rendered.token_ids],
                   SamplingParams(max_tokens=8, temperature=0, stop=stop), tokenizer=tok)[0]
    assert got.text == ref.text.strip() and got.completion_tokens == len(ref.token_ids)


def test_adapter_published_after_startup_is_served_without_restart(client, server, base, store, tiny_models):
    engine = served(server, "tiny").engine
    publish_adapter(store, LATE, tiny_models["tiny"], "tiny", seed=3, rank=8, targets=("mlp.c_fc", "attn.c_proj"))
    # requested by name before any ListModels: the registry rescans the store
    got = client.complete(PROMPTS[0], model=LATE, max_tokens=16, temperature=0, ignore_eos=True)
    assert list(got.token_ids) == reference(base, store, LATE, PROMPTS[0], 16)
    assert served(server, LATE).engine is engine and engine.adapters()[-1] == LATE
    assert {m.name: m.base_model for m in client.list_models()}[LATE] == "tiny"
    # and the adapters loaded before still answer the same
    again = client.complete(PROMPTS[0], model=SQL, max_tokens=16, temperature=0, ignore_eos=True)
    assert list(again.token_ids) == reference(base, store, SQL, PROMPTS[0], 16)


def test_unserved_base_and_merged_models_keep_their_own_engines(client, server, store, tiny_models):
    from lmcore import SamplingParams, generate, load_model
    from lmcore.lora import load_adapter_model

    other = "ft:tiny-b:x:ddd444"  # its base is a path, not a served model: an engine of its own
    publish_adapter(store, other, tiny_models["tiny-b"], str(tiny_models["tiny-b"]), seed=4, rank=2,
                    targets=("attn.c_attn",))
    full = "ft:tiny:merged:eee555"
    tmp = store / ".incoming-full"
    save_tiny_model(tmp, 7, gpt2_tokenizer())
    os.rename(tmp, store / full)
    names = {m.name for m in client.list_models()}
    assert {other, full} <= names
    tiny = served(server, "tiny")
    prompt = PROMPTS[2]
    ids = tiny.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for name, model in ((other, load_adapter_model(load_model(tiny_models["tiny-b"]), store / other)),
                        (full, load_model(store / full))):
        got = client.complete(prompt, model=name, max_tokens=12, temperature=0, ignore_eos=True)
        assert list(got.token_ids) == list(generate(model, [ids], params, tokenizer=tiny.tokenizer)[0].token_ids)
        s = served(server, name)  # (a full store model loads on its first request)
        assert s.engine is not tiny.engine and s.adapter is None and s.async_engine is not tiny.async_engine


def test_bad_adapter_is_skipped_and_the_base_keeps_serving(client, server, store, tiny_models):
    import grpc
    from safetensors.torch import load_file, save_file

    bad = "ft:tiny:bad:fff666"
    tmp = store / ".incoming-bad"
    publish_adapter(store, ".incoming-bad", tiny_models["tiny"], "tiny", seed=5, rank=2, targets=("attn.c_attn",))
    # tensors of another width (A (r, 2 in), B (2 out, r)): they cannot fit the base
    tensors = {k: torch.cat([v, v], dim=1 if k.endswith("lora_A") else 0)
               for k, v in load_file(str(tmp / "adapter_model.safetensors")).items()}
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    os.rename(tmp, store / bad)
    with pytest.raises(grpc.RpcError) as e:
        client.complete("x", model=bad)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "could not be loaded" in e.value.details()
    assert bad not in served(server, "tiny").engine.adapters()
    assert client.complete("hello", model=SQL, max_tokens=3, temperature=0, ignore_eos=True).usage.completion_tokens == 3


def test_adapter_removed_from_the_store_leaves_the_bank(client, server, store, tiny_models):
    import shutil

    import grpc

    gone = "ft:tiny:gone:aaa999"
    publish_adapter(store, gone, tiny_models["tiny"], "tiny", seed=6, rank=2, targets=("attn.c_attn",))
    assert gone in {m.name for m in client.list_models()}
    engine = served(server, "tiny").engine
    assert gone in engine.adapters()
    assert client.complete("hi", model=gone, max_tokens=2, temperature=0, ignore_eos=True).usage.completion_tokens == 2
    shutil.rmtree(store / gone)
    assert gone not in {m.name for m in client.list_models()}  # ListModels refreshes: the slot is freed
    assert gone not in engine.adapters()
    with pytest.raises(grpc.RpcError) as e:
        client.complete("hi", model=gone, max_tokens=2)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and gone in e.value.details()
    # the base and the other adapters serve on
    assert client.complete("hi", model=SQL, max_tokens=2, temperature=0, ignore_eos=True).usage.completion_tokens == 2
    assert SQL in engine.adapters() and "tiny" in {m.name for m in client.list_models()}


def test_registry_retries_a_busy_close_and_closes_adapters_before_their_base(tmp_path):
    """The registry's side, without an engine: a close hook that answers "busy" keeps the entry
    served until a later refresh; an adapter's base waits for the adapter to close first."""
    import asyncio
    import json
    import shutil

    from services.models import ModelRegistry

    store = tmp_path / "store"
    for name, config in (("base", "config.json"), ("ft:base:x:1", "adapter_config.json")):
        (store / name).mkdir(parents=True)
        (store / name / config).write_text(json.dumps({"base_model": "base"}))
    busy = {"ft:base:x:1": 1}  # the adapter is busy once
    closed = []

    async def close_entry(entry, idle_only=False):
        assert idle_only
        if busy.get(entry.name, 0) > 0:
            busy[entry.name] -= 1
            return False
        closed.append(entry.name)
        return True

    async def run():
        registry = ModelRegistry([], lambda spec, reg: spec.name, store=store, close_entry=close_entry)
        await registry.load_all()
        assert registry.names() == ["base", "ft:base:x:1"]
        shutil.rmtree(store / "base")
        shutil.rmtree(store / "ft:base:x:1")
        await registry.refresh()  # the adapter is busy, so its base waits too
        assert registry.names() == ["base", "ft:base:x:1"] and closed == []
        await registry.refresh()
        assert registry.names() == [] and closed == ["ft:base:x:1", "base"]

    asyncio.run(run())
