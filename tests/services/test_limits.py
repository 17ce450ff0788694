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


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(client):
    code, details = _code(lambda: client.complete("x" * (1 << 20), max_tokens=4))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "characters" in details and "context" in details
    code, details = _code(lambda: client.complete([1] * 1_000_000, max_tokens=4))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1000000" in details
    assert client.complete("still serving", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_few_shot_and_score_bounds(client):
    code, details = _code(lambda: client.few_shot("q", [("a", "b")] * 257))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "257" in details
    code, details = _code(lambda: client.few_shot("q", [("a", "b")], instruction="y" * (1 << 20), max_tokens=4))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "characters" in details
    code, details = _code(lambda: client.score("ctx", ["a"] * 65))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "65" in details
    code, details = _code(lambda: client.score("ctx", ["a", "z" * (1 << 20)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "characters" in details


def test_model_names_are_checked_before_any_lookup(client):
    for name in ("m" * 300, "../etc", "a/b"):
        code, details = _code(lambda name=name: client.complete("hi", model=name))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert len(details) < 400


def test_unknown_names_rescan_the_store_once_per_interval_unless_it_changed(server, client):
    registry = server.server.state.registry
    scans = []
    real = registry.scan_store
    registry.scan_store = lambda: scans.append(1) or real()
    try:
        for _ in range(5):
            assert _code(lambda: client.complete("hi", model="ft:none:x:1"))[0] == grpc.StatusCode.NOT_FOUND
        assert len(scans) <= 1  # the first may rescan; the others answer from it
        (registry.store / "new-dir").mkdir()  # the store changed: the next unknown name rescans
        assert _code(lambda: client.complete("hi", model="ft:none:x:2"))[0] == grpc.StatusCode.NOT_FOUND
        assert len(scans) >= 1 and scans.count(1) == len(scans)
        before = len(scans)
        assert _code(lambda: client.complete("hi", model="ft:none:x:3"))[0] == grpc.StatusCode.NOT_FOUND
        assert len(scans) == before
    finally:
        registry.scan_store = real


def test_the_bounded_executor_refuses_past_its_queue_and_recovers():
    import asyncio
    import threading

    from services.errors import ResourceExhausted
    from services.limits import BoundedExecutor

    release = threading.Event()
    pool = BoundedExecutor(1, 1, "score")

    async def main():
        running = asyncio.ensure_future(pool.run(release.wait))
        queued = asyncio.ensure_future(pool.run(lambda: 7))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="2 score requests"):
            await pool.run(lambda: 8)
        release.set()
        assert await running is True and await queued == 7
        for _ in range(1000):
            if pool._in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert await pool.run(lambda: 9) == 9

    asyncio.run(main())
    pool.shutdown()
