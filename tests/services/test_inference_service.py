"""The inference service over real channels, against lmcore in-process on the same checkpoints.

Every RPC unary and streamed; stream == unary; service == ``lmcore.generate``; 16 concurrent
streams == their solo outputs; 20 cancelled streams leave the engine empty; every bad input gets
its status code and the server keeps serving; the model store is picked up without a restart;
auth, RESOURCE_EXHAUSTED, health, metrics and SIGTERM draining on the real process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from services.client import Client
from services.config import InferenceSettings
from services.inference.__main__ import setup
from tests.helpers import ROOT, free_port, gpt2_tokenizer
from tests.helpers.models import save_tiny_model
from tests.helpers.servers import ServerThread

PROMPTS = [
    "Once upon a time", "The capital of France is", "def fib(n):", "日本語で話しましょう", "1, 2, 3, 4,",
    "Hello", "In the beginning", "Q: what is 2+2?\nA:", "{\"name\": \"", "The quick brown fox",
    "Ünïcödé ✓ text", "import torch\n", "Dear Sir,", "Roses are red,", "It was a dark and", "<html>",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(tiny_models, store):
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}", f"tiny-b={tiny_models['tiny-b']}"],
                                 model_store=str(store), max_batch_size=16, max_waiting=64, port=0)
    s = ServerThread(settings, "inference", setup).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_models):
    """The same checkpoints loaded in-process: what the service must reproduce."""
    from lmcore import load_model

    return {name: load_model(path) for name, path in tiny_models.items()}


def ref_generate(model, prompt: str, **kw):
    from lmcore import SamplingParams, generate

    ids = model.tokenizer.encode(prompt)
    return generate(model, [ids], SamplingParams(**kw), tokenizer=model.tokenizer)[0]


def engine_of(server, name: str):
    return server.server.state.registry.lookup(name).obj.engine


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- completions ---------------------------------------------------------------------------------
def test_complete_matches_lmcore_generate(client, reference):
    for name in ("tiny", "tiny-b"):
        for prompt in PROMPTS[:4]:
            ref = ref_generate(reference[name], prompt, max_tokens=24, temperature=0)
            got = client.complete(prompt, model=name, max_tokens=24, temperature=0)
            assert list(got.token_ids) == list(ref.token_ids), (name, prompt)
            assert got.text == ref.text
            assert got.finish_reason == ref.finish_reason
            assert got.usage.prompt_tokens == len(reference[name].tokenizer.encode(prompt))
            assert got.usage.completion_tokens == len(ref.token_ids)
            assert got.model == name
    # the two models really are different (the name routes the request)
    a = client.complete(PROMPTS[0], model="tiny", max_tokens=16, temperature=0, ignore_eos=True)
    b = client.complete(PROMPTS[0], model="tiny-b", max_tokens=16, temperature=0, ignore_eos=True)
    assert list(a.token_ids) != list(b.token_ids)
    assert client.complete(PROMPTS[0], max_tokens=16, temperature=0, ignore_eos=True).token_ids == a.token_ids


def test_stream_concatenates_to_unary(client, reference):
    tok = reference["tiny"].tokenizer
    for prompt in PROMPTS[:6]:
        unary = client.complete(prompt, max_tokens=40, temperature=0)
        chunks = list(client.complete_stream(prompt, max_tokens=40, temperature=0))
        assert "".join(c.text for c in chunks) == unary.text
        assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
        assert [bool(c.finish_reason) for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1].finish_reason == unary.finish_reason
        assert chunks[-1].usage == unary.usage
        # every chunk's text is whole characters: decoding the ids so far never ends mid-character
        so_far = ""
        for c in chunks:
            so_far += c.text
            assert "\ufffd" not in c.text or "\ufffd" in tok.decode(list(unary.token_ids))
        assert so_far == unary.text


def test_stop_strings_stream_and_unary(client):
    full = client.complete(PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True).text
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    if not stop.strip():
        stop = full[cut:cut + 6]
    expected = full[:full.index(stop)]
    got = client.complete(PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "zzzq"])
    assert got.finish_reason == "stop" and got.text == expected
    chunks = list(client.complete_stream(PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True,
                                         stop=[stop, "zzzq"]))
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_prompt_token_ids_and_seeded_sampling(client, reference):
    ids = reference["tiny"].tokenizer.encode(PROMPTS[1])
    by_text = client.complete(PROMPTS[1], max_tokens=12, temperature=0)
    by_ids = client.complete(ids, max_tokens=12, temperature=0)
    assert by_ids.token_ids == by_text.token_ids
    s1 = client.complete(PROMPTS[2], max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    s2 = client.complete(PROMPTS[2], max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    assert s1.token_ids == s2.token_ids


def test_logprobs(client, reference):
    got = client.complete(PROMPTS[0], max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    assert len(got.logprobs) == len(got.token_ids) == 8
    tok = reference["tiny"].tokenizer
    # the first token's logprob, computed directly from the model's logits
    ids = tok.encode(PROMPTS[0])
    with torch.inference_mode():
        logits = reference["tiny"](torch.tensor([ids]))[0, -1]
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, 3)
    first = got.logprobs[0]
    assert first.token_id == got.token_ids[0] == int(top.indices[0])
    assert first.logprob == pytest.approx(float(lp[first.token_id]), abs=1e-4)
    assert [t.token_id for t in first.top_logprobs] == top.indices.tolist()
    assert first.token == tok.token_bytes(first.token_id).decode("utf-8", "replace")
    for entry, tid in zip(got.logprobs, got.token_ids):
        assert entry.token_id == tid and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token_id == tid  # greedy picks the most likely


def test_16_concurrent_streams_equal_solo_outputs(client, server):
    solo = {p: client.complete(p, max_tokens=32, temperature=0) for p in PROMPTS}

    def stream(p):
        chunks = list(client.complete_stream(p, max_tokens=32, temperature=0))
        return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]

    with ThreadPoolExecutor(16) as pool:
        results = dict(zip(PROMPTS, pool.map(stream, PROMPTS)))
    for p in PROMPTS:
        assert results[p] == (solo[p].text, list(solo[p].token_ids)), p
    assert not engine_of(server, "tiny").has_unfinished()


def test_cancelled_streams_abort_engine_requests(client, server):
    engine = engine_of(server, "tiny")
    calls = [client.complete_stream(PROMPTS[i % len(PROMPTS)], max_tokens=100, temperature=0, ignore_eos=True)
             for i in range(20)]
    for call in calls:  # read a couple of chunks from each, so all 20 are mid-generation
        next(call)
        next(call)
    assert engine.has_unfinished()
    for call in calls:
        call.cancel()
    assert wait_until(lambda: not engine.has_unfinished()), f"{engine.num_unfinished()} requests still running"
    # and the server keeps serving
    assert client.complete(PROMPTS[0], max_tokens=4, temperature=0, ignore_eos=True).usage.completion_tokens == 4


def test_deadline_aborts_engine_request(client, server):
    engine = engine_of(server, "tiny")
    with pytest.raises(grpc.RpcError) as e:
        for _ in client.complete_stream(PROMPTS[0], max_tokens=100, temperature=0, ignore_eos=True, timeout=0.02):
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as e:
        client.complete(PROMPTS[1], max_tokens=100, temperature=0, ignore_eos=True, timeout=0.02)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: not engine.has_unfinished())


# --- few-shot, score, list -----------------------------------------------------------------------
EXAMPLES = [("dog", "chien"), ("cat", "chat"), ("house", "maison"), ("tree", "arbre")]


def test_few_shot_matches_lmcore(client, reference):
    from lmcore import FewShotPrompt, SamplingParams, generate

    model = reference["tiny"]
    for style in ("qa", "io"):
        got = client.few_shot("water", EXAMPLES, instruction="English to French.", style=style,
                              max_tokens=10, temperature=0)
        rendered = FewShotPrompt("English to French.", EXAMPLES, style=style).render(
            "water", model.tokenizer, model.config.block_size - 10)
        stop = [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop)
        ref = generate(model, [rendered.token_ids], SamplingParams(max_tokens=10, temperature=0, stop=stop),
                       tokenizer=model.tokenizer)[0]
        assert got.prompt == rendered.text
        assert got.examples_used == rendered.examples_used == 4
        assert got.prompt_tokens == len(rendered.token_ids)
        assert got.text == ref.text.strip()
        assert got.finish_reason == ref.finish_reason
        assert got.completion_tokens == len(ref.token_ids)


def test_few_shot_drops_examples_that_do_not_fit(client):
    many = [(f"word number {i} " * 3, f"answer {i} " * 3) for i in range(40)]
    got = client.few_shot("last", many, style="qa", max_tokens=8, temperature=0)
    assert 0 < got.examples_used < 40
    assert got.prompt_tokens + 8 <= 128


def test_score_matches_lmcore(client, reference):
    from lmcore.tasks import score

    model = reference["tiny"]
    tok = model.tokenizer
    choices = [" blue", " green and yellow", " the colour of the sea"]
    got = client.score("The sky is", choices)
    ref = score(model, tok.encode("The sky is"), [tok.encode(c) for c in choices])
    assert [c.text for c in got.choices] == choices
    for g, r, c in zip(got.choices, ref, choices):
        assert g.logprob == pytest.approx(float(r.logprob), abs=1e-4)
        assert list(g.token_logprobs) == pytest.approx([float(x) for x in r.token_logprobs], abs=1e-4)
        assert g.num_tokens == len(tok.encode(c))
    assert got.best == max(range(3), key=lambda i: ref[i].logprob)
    empty_ctx = client.score("", [" hello"])
    assert len(empty_ctx.choices[0].token_logprobs) == 1


def test_list_models(client):
    models = client.list_models()
    assert [m.name for m in models[:2]] == ["tiny", "tiny-b"]
    tiny = models[0]
    assert tiny.is_default and not models[1].is_default
    assert (tiny.context_length, tiny.vocab_size, tiny.n_layer, tiny.n_head, tiny.n_embd) == (128, 50257, 2, 4, 64)
    assert tiny.parameters > 0 and tiny.source == "config"
    assert models[1].context_length == 96


def test_model_store_served_without_restart(client, server, store, reference):
    from lmcore.lora import LoRAConfig, apply_lora, load_adapter_model, save_adapter

    tok = gpt2_tokenizer()
    full = "ft:tiny:demo:abc123"
    save_tiny_model(store / ".incoming", 5, tok)
    os.rename(store / ".incoming", store / full)  # atomic publish, like a fine-tuning job
    names = [m.name for m in client.list_models()]
    assert full in names
    got = client.complete(PROMPTS[0], model=full, max_tokens=12, temperature=0, ignore_eos=True)
    from lmcore import load_model

    ref = ref_generate(load_model(store / full), PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True)
    assert list(got.token_ids) == list(ref.token_ids)

    # a LoRA adapter on the served base "tiny", requested by name before any ListModels
    torch.manual_seed(3)
    base = reference["tiny"]
    trained = apply_lora(load_model(server.server.state.registry.lookup("tiny").spec.path),
                         LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero adapter, so outputs differ from the base
    adapter = "ft:tiny:lora:xyz789"
    save_adapter(trained, store / ".incoming-a", base_model="tiny")
    os.rename(store / ".incoming-a", store / adapter)
    got = client.complete(PROMPTS[0], model=adapter, max_tokens=12, temperature=0, ignore_eos=True)
    ref = ref_generate(load_adapter_model(base, store / adapter), PROMPTS[0], max_tokens=12, temperature=0,
                       ignore_eos=True)
    assert list(got.token_ids) == list(ref.token_ids)
    info = {m.name: m for m in client.list_models()}
    assert info[adapter].base_model == "tiny" and info[adapter].source == "store"

    # a broken entry is skipped, the rest keeps serving
    (store / "ft:tiny:broken:1").mkdir()
    (store / "ft:tiny:broken:1" / "config.json").write_text("{not json")
    assert "ft:tiny:broken:1" not in [m.name for m in client.list_models()]
    with pytest.raises(grpc.RpcError) as e:
        client.complete("x", model="ft:tiny:broken:1")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "could not be loaded" in e.value.details()
    shutil.rmtree(store / "ft:tiny:broken:1")


# --- errors --------------------------------------------------------------------------------------
BAD = [
    ("negative temperature", dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("top_p zero", dict(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("top_p above one", dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("max_tokens zero", dict(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("max_tokens past context", dict(max_tokens=500), grpc.StatusCode.INVALID_ARGUMENT, "128"),
    ("too many stop strings", dict(stop=[f"s{i}" for i in range(9)]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ("empty stop string", dict(stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ("too many logprobs", dict(logprobs=1000), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    ("unknown model", dict(model="gpt-7"), grpc.StatusCode.NOT_FOUND, "tiny"),
    ("empty prompt", dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("prompt past context", dict(prompt="word " * 300), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ("token id out of range", dict(prompt=[1, 2, 99999]), grpc.StatusCode.INVALID_ARGUMENT, "99999"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_and_server_keeps_serving(client, case):
    _, kw, code, needle = case
    kw = dict(kw)
    prompt = kw.pop("prompt", "hello")
    for call in (lambda: client.complete(prompt, **kw),
                 lambda: list(client.complete_stream(prompt, **kw))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code, e.value.details()
        assert needle in e.value.details()
    assert client.complete("hello", max_tokens=2, temperature=0).usage.completion_tokens >= 1


def test_bad_few_shot_and_score(client):
    for call, code in [
        (lambda: client.few_shot("q", EXAMPLES, style="no-such-style"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.few_shot("", EXAMPLES), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.few_shot("q", EXAMPLES, temperature=-2), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.few_shot("q", EXAMPLES, model="nope"), grpc.StatusCode.NOT_FOUND),
        (lambda: client.score("ctx", []), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.score("ctx", ["a", ""]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.score("word " * 200, ["a"]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.score("ctx", ["a"], model="nope"), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code, e.value.details()
    assert client.score("ok", [" yes"]).choices[0].num_tokens == 1


def test_auth_and_queue_full(tiny_models):
    settings = InferenceSettings(models=[str(tiny_models["tiny"])], api_keys=["secret"], max_batch_size=1,
                                 max_waiting=1, port=0)
    s = ServerThread(settings, "inference", setup).start()
    try:
        with Client(s.target) as anon, Client(s.target, api_key="secret") as c:
            for call in (lambda: anon.complete("hi"), lambda: list(anon.complete_stream("hi")),
                         lambda: anon.list_models()):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert anon.health_status() == "SERVING"
            assert [m.name for m in c.list_models()] == ["tiny"]

            codes: list = []
            lock = threading.Lock()

            def run(i):
                try:
                    list(c.complete_stream(PROMPTS[i], max_tokens=100, temperature=0, ignore_eos=True))
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                with lock:
                    codes.append(code)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
            assert codes.count(grpc.StatusCode.OK) >= 2, codes
            assert c.complete("after", max_tokens=3, temperature=0, ignore_eos=True).usage.completion_tokens == 3
    finally:
        s.stop()


def test_not_serving_until_models_load(tiny_models):
    import asyncio

    gate = threading.Event()

    async def gated_setup(server):
        ready, cleanup = await setup(server)

        async def gated_ready():
            await asyncio.to_thread(gate.wait, 60)
            await ready()

        return gated_ready, cleanup

    s = ServerThread(InferenceSettings(models=[str(tiny_models["tiny"])], port=0), "inference", gated_setup)
    s.start(wait_ready=False)
    try:
        with Client(s.target) as c:
            assert c.health_status() == "NOT_SERVING"
            assert c.health_status("lmstack.v1.InferenceService") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                c.complete("hi")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
            gate.set()
            c.wait_ready(timeout=60)
            assert c.complete("hi", max_tokens=2, temperature=0, ignore_eos=True).usage.completion_tokens == 2
    finally:
        gate.set()
        s.stop()


# --- the real process ----------------------------------------------------------------------------
def test_module_entrypoint_metrics_and_graceful_sigterm(tiny_models):
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "LMSTACK_MODELS": f"tiny={tiny_models['tiny']}", "LMSTACK_TORCH_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.inference", "--port", str(port),
                             "--metrics-port", str(metrics_port), "--grace-period-s", "30"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_ready(timeout=90)
            assert c.complete("warm up", max_tokens=4, temperature=0, ignore_eos=True).usage.completion_tokens == 4
            stream = c.complete_stream("Once upon a time", max_tokens=100, temperature=0, ignore_eos=True)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)  # in-flight streams finish within the grace period
            rest = list(stream)
            assert sum(len(x.token_ids) for x in [first, *rest]) == 100
            assert rest[-1].finish_reason == "length"
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "draining" in out and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_metrics_names(tiny_models):
    metrics_port = free_port()
    settings = InferenceSettings(models=[str(tiny_models["tiny"])], metrics_port=metrics_port, port=0)
    s = ServerThread(settings, "inference", setup).start()
    try:
        with Client(s.target) as c:
            list(c.complete_stream("hi", max_tokens=5, temperature=0, ignore_eos=True))
            with pytest.raises(grpc.RpcError):
                c.complete("hi", temperature=-1)
        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()

        # the error boundary counts a failed RPC as it ends, which may be just after the client saw it
        rpc_error = 'code="INVALID_ARGUMENT",method="/lmstack.v1.InferenceService/Complete"'
        wait_until(lambda: rpc_error in scrape(), timeout=30)
        body = scrape()
        for name in ["lmstack_inference_time_to_first_token_seconds_bucket",
                     "lmstack_inference_time_per_output_token_seconds_bucket",
                     "lmstack_inference_request_latency_seconds_bucket",
                     'lmstack_inference_generation_tokens_total{model="tiny"} 5.0',
                     'lmstack_inference_running_requests{model="tiny"} 0.0',
                     'lmstack_inference_queue_depth_requests{model="tiny"} 0.0',
                     'code="INVALID_ARGUMENT",method="/lmstack.v1.InferenceService/Complete"',
                     # the engine's own (lmcore.engine.stats), per model and adapter
                     'lmstack_inference_requests_finished_total{adapter="",finish_reason="length",model="tiny"} 1.0',
                     'lmstack_inference_requests_finished_total{adapter="",finish_reason="aborted",model="tiny"} 0.0',
                     'lmstack_inference_request_queue_time_seconds_count{adapter="",model="tiny"} 1.0',
                     'lmstack_inference_request_prefill_time_seconds_count{adapter="",model="tiny"} 1.0',
                     'lmstack_inference_request_decode_time_seconds_count{adapter="",model="tiny"} 1.0',
                     f'lmstack_inference_queue_capacity_requests{{model="tiny"}} {float(settings.max_waiting)}',
                     'lmstack_inference_kv_cache_slot_usage_ratio{model="tiny"} 0.0',
                     'lmstack_inference_kv_cache_token_usage_ratio{model="tiny"} 0.0',
                     'lmstack_inference_prefix_cache_query_tokens_total{model="tiny"}']:
            assert name in body, name
        steps = s.server.state.registry.lookup("tiny").obj.engine.stats()["steps"]
        assert f'lmstack_inference_batch_size_requests_count{{model="tiny"}} {float(steps)}' in body
        assert f'lmstack_inference_engine_step_duration_seconds_count{{model="tiny"}} {float(steps)}' in body
    finally:
        s.stop()
