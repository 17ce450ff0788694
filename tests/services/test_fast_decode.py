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
                                 speculative_tokens=3, port=0)
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
