"""Limits where values enter the services: every bound answers INVALID_ARGUMENT (or
RESOURCE_EXHAUSTED) with a short message, before the work, while other streams keep going."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.client import Client
from services.config import InferenceSettings
from services.errors import MAX_MESSAGE_CHARS
from services.inference.__main__ import setup
from tests.helpers.servers import ServerThread


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(tmp_path_factory.mktemp("st")),
                                 max_batch_size=8, port=0)
    s = ServerThread(settings, "inference", setup).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_overflowing_sampling_values_are_refused_while_other_streams_finish(client):
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(lambda p=p: list(client.complete_stream(p, max_tokens=60, temperature=0,
                                                                       ignore_eos=True)))
                   for p in ("one", "two", "three")]
        for kw in (dict(temperature=1e-38), dict(repetition_penalty=1e-38), dict(temperature=float("nan")),
                   dict(top_p=float("inf")), dict(temperature=1e30)):
            code, details = _code(lambda kw=kw: list(client.complete_stream("hi", max_tokens=60, **kw)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert next(iter(kw)) in details
        for s in streams:
            chunks = s.result()
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 60


def test_huge_stop_strings_give_a_short_message(client):
    code, details = _code(lambda: client.complete("hi", stop=["x" * (1 << 20)] * 7))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "stop" in details
    assert len(details) <= MAX_MESSAGE_CHARS + 100


def test_few_shot_takes_the_documented_eight_stop_strings(client):
    out = client.few_shot("water", [("fire", "hot"), ("ice", "cold")], max_tokens=4, temperature=0,
                          stop=[f"#{i}#" for i in range(8)])
    assert out.examples_used == 2
