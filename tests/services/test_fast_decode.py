"""Issue 15 through the services: int8 models per name (--quantize) and speculative decoding
over real gRPC, against lmcore in-process on the same checkpoints."""

from __future__ import annotations

import grpc
import pytest

from services.cli.serve import check_quantize
from services.client import Client
from services.config import InferenceSettings
from services.inference.__main__ import setup
from tests.helpers.servers import ServerThread


@pytest.fixture(scope="module")
def server(tiny_models):
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}", f"tiny-b={tiny_models['tiny-b']}"],
                                 quantize=["tiny=int8"], draft_models=[f"tiny={tiny_models['tiny-b']}"],
                                 speculative_tokens=3, draft_min_confidence=0.0, port=0)  # a random draft: never sure
    s = ServerThread(settings, "inference", setup).start()
    yield s
    s.stop()


def test_quantize_applies_per_model_and_matches_lmcore_int8(server, tiny_models):
    from lmcore import SamplingParams, generate, load_model

    registry = server.server.state.registry
    assert registry.lookup("tiny").obj.model.quantization == "int8"
    assert registry.lookup("tiny-b").obj.model.quantization is None
    ref = load_model(tiny_models["tiny"], quantize="int8")
    with Client(server.target, timeout=60) as c:
        for prompt in ("def fib(n):", "Once upon a time"):
            ids = ref.tokenizer.encode(prompt)
            want = generate(ref, [ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
            got = c.complete(prompt, model="tiny", max_tokens=16, temperature=0, ignore_eos=True)
            assert list(got.token_ids) == want.token_ids


def test_quantize_settings_and_serve_flag():
    s = InferenceSettings(models=["a=/x", "b=/y"], quantize="int8,b=int8")
    assert s.quantization_of("a") == "int8" and s.quantization_of("b") == "int8"
    assert InferenceSettings(models=["a=/x"], quantize=["b=int8"]).quantization_of("a") is None
    check_quantize(["int8", "pycode=int8"])
    with pytest.raises(SystemExit, match="unknown quantization 'int4'"):
        check_quantize(["pycode=int4"])


def test_speculation_over_grpc_is_exact_per_request_and_counted(server, tiny_models):
    from lmcore import SamplingParams, generate, load_model

    ref = load_model(tiny_models["tiny"], quantize="int8")
    engine = server.server.state.registry.lookup("tiny").obj.engine
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
    ids = ref.tokenizer.encode(prompt)
    want = generate(ref, [ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculation="off"))[0]
    with Client(server.target, timeout=60) as c:
        for mode in ("prompt_lookup", "draft", None, "off"):
            before = engine.stats()["spec_proposed_tokens"]
            got = c.complete(prompt, model="tiny", max_tokens=24, temperature=0, ignore_eos=True, speculation=mode)
            assert list(got.token_ids) == want.token_ids, mode
            assert (engine.stats()["spec_proposed_tokens"] > before) == (mode != "off"), mode
        sampled = [c.complete(prompt, model="tiny", max_tokens=12, temperature=0.9, seed=3, ignore_eos=True,
                              speculation="draft").token_ids for _ in range(2)]
        assert sampled[0] == sampled[1]  # seeded: reproducible
        for bad, match in (({"speculation": "always"}, "speculation"), ({"speculative_tokens": 0}, "speculative_tokens"),
                           ({"speculation": "draft", "model": "tiny-b"}, "no draft model")):
            with pytest.raises(grpc.RpcError) as err:
                c.complete(prompt, max_tokens=4, **{"model": "tiny", **bad})
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in err.value.details()
        assert c.complete(prompt, model="tiny", max_tokens=4).usage.completion_tokens == 4  # still serving


def test_lmstack_serve_with_quantize_and_speculation_over_grpc_and_http(tiny_models, tmp_path):
    """The real ``lmstack serve``: --quantize per model, --speculation as the server default, the
    per-request fields over gRPC and the OpenAI HTTP API (extra body fields)."""
    import subprocess
    import sys

    import openai

    from lmcore import SamplingParams, generate, load_model
    from tests.helpers import ROOT, free_port

    ports = {"inference": free_port(), "tokenizer": free_port(), "http": free_port()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--data-dir", str(tmp_path / "data"), "--no-finetune",
         "--metrics-port", "0", "--inference-port", str(ports["inference"]), "--tokenizer-port",
         str(ports["tokenizer"]), "--http-port", str(ports["http"]), "--model", f"tiny={tiny_models['tiny']}",
         "--quantize", "tiny=int8", "--speculation", "prompt_lookup", "--speculative-tokens", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("logs:"):
                break
        assert proc.poll() is None and "lmstack is serving" in "".join(lines), "".join(lines)
        ref = load_model(tiny_models["tiny"], quantize="int8")
        prompt = "one two three four. one two three four. one two three"
        want = generate(ref, [ref.tokenizer.encode(prompt)],
                        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), tokenizer=ref.tokenizer)[0]
        with Client(f"127.0.0.1:{ports['inference']}", timeout=60) as c:
            for mode in (None, "off", "prompt_lookup"):
                got = c.complete(prompt, max_tokens=16, temperature=0, ignore_eos=True, speculation=mode)
                assert list(got.token_ids) == want.token_ids, mode
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key="x", max_retries=0, timeout=60)
        for body in ({}, {"speculation": "prompt_lookup", "speculative_tokens": 2}, {"speculation": "off"}):
            r = http.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True, **body})
            assert r.choices[0].text == want.text, body
        with pytest.raises(openai.BadRequestError, match="speculation"):
            http.completions.create(model="tiny", prompt=prompt, max_tokens=4, extra_body={"speculation": "always"})
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
