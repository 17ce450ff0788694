"""The OpenAI-compatible HTTP API with the real ``openai`` client, against a real ``lmstack serve``.

Two models on free ports: ``chat`` (its tokenizer_config.json carries a chat template) and
``plain`` (none). Greedy text equals gRPC Complete's, streamed chunks concatenate to the unary
text, seeded ``n=3`` is reproducible, logprobs and echo match Score, stop strings, every error class
the client has, chat with and without a template. A second, in-process server (one slot, no
waiting room) shows the full queue as RateLimitError and that a client going away mid-stream
leaves its engine with nothing unfinished; fuzzed bodies always get a 4xx in OpenAI's shape.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import transformers

from lmcore.model import save_pretrained
from services.client import Client
from services.config import InferenceSettings
from services.inference.__main__ import setup
from tests.helpers import ROOT, free_port, gpt2_tokenizer
from tests.helpers.models import gpt2_vocab_model
from tests.helpers.servers import ServerThread

KEY = "sk-test-key"
# Loops, loop controls, raise_exception, trim/lstrip-sensitive whitespace, a special token.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "    {% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "    {% if loop.first and message['role'] == 'system' %}{{ message['content'] }}\n\n{% continue %}{% endif %}\n"
    "{{ message['role'] | upper }}: {{ message['content'] }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}ASSISTANT:{% else %}{{ eos_token }}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is a list in Python?"}]


def write_models(root):
    tok = gpt2_tokenizer()
    chat, plain = root / "chat", root / "plain"
    save_pretrained(gpt2_vocab_model(seed=11), chat, tokenizer=tok)
    save_pretrained(gpt2_vocab_model(seed=12), plain, tokenizer=tok)
    cfg_path = chat / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return chat, plain


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """``lmstack serve`` (no fine-tuning) with the two models and an API key, on free ports."""
    root = tmp_path_factory.mktemp("openai")
    chat, plain = write_models(root)
    ports = {"inference": free_port(), "tokenizer": free_port(), "http": free_port()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--data-dir", str(root / "data"), "--no-finetune",
         "--metrics-port", "0", "--inference-port", str(ports["inference"]), "--tokenizer-port",
         str(ports["tokenizer"]), "--http-port", str(ports["http"]), "--model", f"chat={chat}",
         "--model", f"plain={plain}", "--api-key", KEY, "--max-batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("logs:"):
            break
    banner = "".join(lines)
    if proc.poll() is not None or "lmstack is serving" not in banner:
        proc.kill()
        pytest.fail("lmstack serve did not come up:\n" + banner)
    base_url = f"http://127.0.0.1:{ports['http']}/v1"
    yield {"banner": banner, "base_url": base_url, "grpc": f"127.0.0.1:{ports['inference']}",
           "tokenizer": f"127.0.0.1:{ports['tokenizer']}",
           "chat_dir": chat, "plain_dir": plain}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(platform):
    return openai.OpenAI(base_url=platform["base_url"], api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def grpc_client(platform):
    with Client(platform["grpc"], api_key=KEY) as c:
        yield c


@pytest.fixture(scope="module")
def tok(platform):
    with Client(platform["tokenizer"], api_key=KEY) as c:
        yield c


def test_serve_prints_the_openai_endpoint_and_lists_models(platform, client):
    assert f"openai     {platform['base_url']}" in platform["banner"], platform["banner"]
    models = client.models.list()
    assert {m.id for m in models.data} == {"chat", "plain"}
    assert client.models.retrieve("plain").id == "plain"
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.models.retrieve("no-such-model")


def test_greedy_completion_equals_grpc_complete(client, grpc_client, tok):
    for prompt in ("def fib(n):", "The capital of France is"):
        got = client.completions.create(model="plain", prompt=prompt, max_tokens=12, temperature=0)
        ref = grpc_client.complete(prompt, model="plain", max_tokens=12, temperature=0)
        assert got.choices[0].text == ref.text and got.choices[0].text
        assert got.usage.completion_tokens == ref.usage.completion_tokens
        assert got.usage.prompt_tokens == ref.usage.prompt_tokens
        assert got.choices[0].finish_reason == {"eos": "stop"}.get(ref.finish_reason, ref.finish_reason)
    ids = tok.encode("Once upon a time", model="plain")  # a prompt given as token ids
    by_ids = client.completions.create(model="plain", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == grpc_client.complete(ids, model="plain", max_tokens=8, temperature=0).text


def test_stream_concatenates_to_the_unary_text_with_usage(client):
    kw = dict(model="plain", prompt="import torch\n", max_tokens=16, temperature=0)
    unary = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == unary.choices[0].finish_reason


def test_n_choices_with_a_seed_are_reproducible_and_distinct(client):
    kw = dict(model="plain", prompt="Once upon a time", max_tokens=12, temperature=1.5, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # choice i samples with seed + i
    streamed = {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == texts


def test_logprobs_top_alternatives_match_score(client, grpc_client, tok):
    prompt = "Hello world, this is"
    got = client.completions.create(model="plain", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == got.usage.completion_tokens
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the best
        assert top[token] == pytest.approx(value, abs=1e-6)
    text = got.choices[0].text
    assert tok.encode(prompt, model="plain") + tok.encode(text, model="plain") == \
        tok.encode(prompt + text, model="plain")  # Score tokenizes the same tokens
    ref = grpc_client.score(prompt, [text], model="plain").choices[0]
    assert ref.num_tokens == len(lp.tokens)
    assert lp.token_logprobs == pytest.approx(list(ref.token_logprobs), abs=1e-4)
    assert lp.text_offset == [len(prompt) + len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]


def test_echo_with_max_tokens_0_returns_the_prompt_logprobs(client, grpc_client, tok):
    context, rest = "Hello", " world, this is a test of echo"
    got = client.completions.create(model="plain", prompt=context + rest, max_tokens=0, echo=True, logprobs=1)
    choice = got.choices[0]
    assert choice.text == context + rest and got.usage.completion_tokens == 0
    lp = choice.logprobs
    ids = tok.encode(context + rest, model="plain")
    assert len(lp.tokens) == len(ids) == got.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    ref = grpc_client.score(context, [rest], model="plain").choices[0]
    assert ref.num_tokens == len(ids) - 1
    assert lp.token_logprobs[1:] == pytest.approx(list(ref.token_logprobs), abs=1e-4)
    # echo + generation: the prompt's figures, then the generated tokens'
    both = client.completions.create(model="plain", prompt=context + rest, max_tokens=3, echo=True, logprobs=2,
                                     temperature=0)
    assert both.choices[0].text.startswith(context + rest)
    assert both.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert len(both.choices[0].logprobs.tokens) == len(ids) + 3
    # Scoring generates nothing, so a prompt (token ids, as lm-eval sends) may fill the whole context;
    # generating even one token after it may not.
    n_ctx = client.models.retrieve("plain").model_extra["max_model_len"]
    assert n_ctx > 0
    full = (ids * n_ctx)[:n_ctx]
    got = client.completions.create(model="plain", prompt=full, max_tokens=0, echo=True, logprobs=1)
    assert got.usage.prompt_tokens == n_ctx and len(got.choices[0].logprobs.tokens) == n_ctx
    assert got.usage.completion_tokens == 0 and got.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="exceeds the context"):
        client.completions.create(model="plain", prompt=full, max_tokens=1, echo=True, logprobs=1)


def test_stop_strings(client):
    full = client.completions.create(model="plain", prompt="1, 2, 3,", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    at = next(k for k in range(1, len(full) - 3) if full.find(full[k:k + 3]) == k)  # its first occurrence
    stop = full[at:at + 3]
    got = client.completions.create(model="plain", prompt="1, 2, 3,", max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == full[:full.index(stop)] and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="plain", prompt="1, 2, 3,", max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text


@pytest.mark.parametrize("kw, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 100_000}, None),  # past the context: the engine's message names both numbers
    ({"logprobs": 50}, "logprobs"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "x"}, "suffix"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
])
def test_bad_parameters_are_bad_request_errors_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="plain", prompt="Hello", **{"max_tokens": 4, **kw})
    err = info.value.body
    assert err["message"] and "Traceback" not in err["message"]
    if param:
        assert param in (err["param"] or "") or param in err["message"], err
    else:
        assert "context" in err["message"]


def test_unknown_model_missing_and_wrong_keys(platform, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=2)
    wrong = openai.OpenAI(base_url=platform["base_url"], api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="plain", prompt="Hello", max_tokens=2)
    # No Authorization header at all (the openai client always sends one): plain urllib.
    req = urllib.request.Request(platform["base_url"] + "/models")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401
    assert "missing API key" in json.loads(info.value.read())["error"]["message"]
    with urllib.request.urlopen(platform["base_url"].removesuffix("/v1") + "/health", timeout=10) as r:  # open
        assert r.status == 200


def test_chat_with_a_template_and_a_400_without(platform, client):
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(platform["chat_dir"])
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)  # the reference
    got = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=0)
    ref = client.completions.create(model="chat", prompt=rendered, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == ref.choices[0].text
    assert got.usage.prompt_tokens == ref.usage.prompt_tokens
    stream = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ref.choices[0].text
    with_lp = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=4, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = with_lp.choices[0].logprobs.content
    assert len(content) == with_lp.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="plain", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="unknown role"):  # the template's raise_exception
        client.chat.completions.create(model="chat", messages=[{"role": "tool", "content": "x",
                                                                "tool_call_id": "1"}], max_tokens=4)


# --- structured output: response_format and vLLM's guided_* ---------------------------------------
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120},
                         "langs": {"type": "array", "items": {"enum": ["py", "rs", "go"]}, "maxItems": 3}},
          "required": ["name", "age", "langs"], "additionalProperties": False}


def test_response_format_json_schema_and_json_object(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        got = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=80, temperature=1.0,
                                             seed=seed, response_format=fmt)
        assert got.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(got.choices[0].message.content), PERSON)
    streamed = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=80, temperature=1.0,
                                              seed=2, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == got.choices[0].message.content
    obj = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=200, temperature=0,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # "length": the partial text, still an object's beginning
        assert obj.choices[0].message.content.startswith("{")
    text = client.completions.create(model="plain", prompt="x", max_tokens=80, temperature=1.0, seed=4,
                                     extra_body={"response_format": fmt})  # vLLM takes it on completions too
    jsonschema.validate(json.loads(text.choices[0].text), PERSON)


def test_vllm_guided_fields(client):
    import re

    import jsonschema

    def complete(**extra):
        return client.completions.create(model="plain", prompt="value:", max_tokens=60, temperature=1.0, seed=5,
                                         n=3, extra_body=extra).choices

    for c in complete(guided_json=PERSON):
        jsonschema.validate(json.loads(c.text), PERSON)
    for c in complete(guided_regex=r"[a-f0-9]{4}-[0-9]{2}", guided_decoding_backend="xgrammar"):
        assert re.fullmatch(r"[a-f0-9]{4}-[0-9]{2}", c.text) and c.finish_reason == "stop"
    assert {c.text for c in complete(guided_choice=["left", "right"])} <= {"left", "right"}
    for c in complete(guided_grammar='root ::= "(" [0-9] ("+" [0-9])* ")"'):
        assert re.fullmatch(r"\([0-9](\+[0-9])*\)", c.text) or c.finish_reason == "length"


@pytest.mark.parametrize("extra, needle", [
    ({"guided_regex": "[a-"}, "invalid regex"),
    ({"guided_json": {"type": "integer", "minimum": 3, "maximum": 1}}, "minimum greater than maximum"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"guided_grammar": "root ::= "}, "invalid grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "at most one"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "at most one"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
    ({"guided_decoding_backend": "outlines"}, "xgrammar"),
])
def test_bad_constraints_are_400s(client, extra, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="plain", prompt="Hello", max_tokens=4, extra_body=extra)
    err = info.value.body
    assert needle in err["message"] or needle in (err["param"] or ""), err
    assert "Traceback" not in err["message"]

def _post(base: str, path: str, payload, key: str | None = None) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, data, headers), timeout=60) as r:
            raw = r.read()
            return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tokenize_and_detokenize(platform, tok):
    base = platform["base_url"].removesuffix("/v1")
    status, got = _post(base, "/tokenize", {"model": "plain", "prompt": "Hello world"}, KEY)
    assert status == 200 and got["tokens"] == tok.encode("Hello world", model="plain")
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 256
    status, back = _post(base, "/detokenize", {"model": "plain", "tokens": got["tokens"]}, KEY)
    assert status == 200 and back == {"prompt": "Hello world"}
    status, err = _post(base, "/detokenize", {"model": "plain", "tokens": [10**6]}, KEY)
    assert status == 400 and "outside the vocabulary" in err["error"]["message"]


# --- a one-slot server in this process: the full queue, a client that goes away, fuzzing ----------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-small")
    _, plain = write_models(root)
    (root / "store").mkdir()
    settings = InferenceSettings(models=[f"plain={plain}"], port=0, http_port=free_port(), max_batch_size=1,
                                 max_waiting=0, model_store=str(root / "store"), store_refresh_interval_s=0)
    server = ServerThread(settings, "inference", setup).start()
    yield server, f"http://127.0.0.1:{settings.http_port}"
    server.stop()


def test_fine_tuned_models_appear_in_the_models_list(small):
    server, base = small
    store = Path(server.settings.model_store)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["plain"]
    shutil.copytree(server.settings.models[0].split("=", 1)[1], store / "ft:plain:demo:abc123")  # a publish
    assert [m.id for m in client.models.list().data] == ["plain", "ft:plain:demo:abc123"]
    assert client.models.retrieve("ft:plain:demo:abc123").id == "ft:plain:demo:abc123"
    assert client.completions.create(model="ft:plain:demo:abc123", prompt="Hello", max_tokens=2).choices


def _engine(server):
    return server.server.state.registry.lookup("plain").obj.engine


def _wait_idle(server, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _engine(server).has_unfinished():
            return True
        time.sleep(0.05)
    return False


def test_a_full_queue_is_a_rate_limit_error(small):
    server, base = small
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    busy = client.completions.create(model="plain", prompt="Hello", max_tokens=200, temperature=0, stream=True,
                                     extra_body={"ignore_eos": True})
    next(iter(busy))  # its first chunk: it holds the only slot
    with pytest.raises(openai.RateLimitError, match="overloaded"):
        client.completions.create(model="plain", prompt="Hello", max_tokens=2)
    busy.close()
    assert _wait_idle(server)
    assert client.completions.create(model="plain", prompt="Hello", max_tokens=2).choices  # served again


def test_a_client_that_disconnects_mid_stream_aborts_its_request(small):
    server, base = small
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    aborted = _engine(server).stats()["requests_aborted"]
    stream = client.completions.create(model="plain", prompt="Once", max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    assert _engine(server).has_unfinished()
    stream.close()  # the connection goes away
    assert _wait_idle(server), "the engine kept generating for a client that left"
    stats = _engine(server).stats()
    assert stats["requests_aborted"] == aborted + 1 and stats["tokens_generated"] < 200 * 100


def _random_value(rng: random.Random):
    return rng.choice([None, True, -1, 0, 1, 2**31, 2**63, 10**30, -10**30, 1e308, -0.0, 0.5, "", "x" * 300,
                       "NaN", [], [1, "a"], [[1, 2], [3]], [-5], {}, {"a": 1}, [None]])


def test_fuzzed_bodies_are_always_a_4xx_in_openai_shape(small):
    server, base = small
    rng = random.Random(1234)
    fields = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "echo",
              "stream", "presence_penalty", "frequency_penalty", "best_of", "suffix", "logit_bias", "user",
              "stream_options", "top_k", "unknown_field"]
    bodies = [b"", b"{", b"[]", b"null", b'"text"', b'{"prompt": NaN}', b'{"prompt": "a", "temperature": NaN}',
              b'{"prompt": "a", "max_tokens": Infinity}', b'{"prompt": "a", "max_tokens": 1e400}',
              b'{"prompt": "a", "n": 100000}', b'{"prompt": [[]]}', b'{"prompt": []}', b'{}',
              b'{"prompt": "a", "seed": 99999999999999999999999}']
    for _ in range(120):
        body = {"prompt": "Hello"} if rng.random() < 0.7 else {}
        for f in rng.sample(fields, rng.randint(1, 4)):
            body[f] = _random_value(rng)
        body.setdefault("max_tokens", 2)
        bodies.append(json.dumps(body).encode())
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        for raw in bodies[:40] if path != "/v1/completions" else bodies:
            status, payload = _post(base, path, raw)
            if status == 200:
                continue  # a valid body by chance (e.g. stream false, a 2-token completion)
            assert 400 <= status < 500, (path, raw, status, payload)
            err = payload["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], payload
            assert "Traceback" not in err["message"]
    assert _wait_idle(server)
    status, _ = _post(base, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert status == 200  # still serving


def test_python_m_services_http_alone_health_and_sigterm(tmp_path):
    """``python -m services.http``: the API without gRPC; /health 503 until loaded, then 200; SIGTERM
    drains and exits 0."""
    _, plain = write_models(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.http", "--http-port", str(port), "--models",
                             f"plain={plain}", "--grace-period-s", "5"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        seen, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    seen.append(r.status)
                    break
            except urllib.error.HTTPError as e:
                assert e.code == 503 and json.loads(e.read())["error"]["message"] == "loading models"
                seen.append(503)
            except OSError:
                pass  # not listening yet
            time.sleep(0.05)
        assert seen and seen[-1] == 200, (seen, proc.poll())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="plain", prompt="Hello", max_tokens=3).usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
