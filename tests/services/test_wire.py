"""The wire: bytes that are not the RPC's request message are INVALID_ARGUMENT on every kind of RPC
(unary, client-, server- and bidi-streaming, health and reflection included), and the server's own
limits (concurrent RPCs) come from the settings."""

from __future__ import annotations

import grpc
import pytest

from services.config import TokenizerSettings
from services.tokenizer.__main__ import setup
from tests.helpers import GPT2_TIKTOKEN
from tests.helpers.servers import ServerThread

GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", b"\x08", b"\x00\x00"]  # corrupt for any message


@pytest.fixture(scope="module")
def server():
    settings = TokenizerSettings(models=[f"gpt2={GPT2_TIKTOKEN}"], port=0, max_concurrent_rpcs=4)
    s = ServerThread(settings, "tokenizer", setup).start()
    yield s
    s.stop()


def test_malformed_requests_are_invalid_argument(server):
    with grpc.insecure_channel(server.target) as ch:
        calls = [ch.unary_unary("/lmstack.v1.TokenizerService/Encode"),
                 ch.unary_unary("/grpc.health.v1.Health/Check")]
        for call in calls:
            for data in GARBAGE:
                with pytest.raises(grpc.RpcError) as e:
                    call(data, timeout=30)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, e.value.details())
                assert "malformed request" in e.value.details()
        watch = ch.unary_stream("/grpc.health.v1.Health/Watch")
        with pytest.raises(grpc.RpcError) as e:
            list(watch(GARBAGE[0], timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reflect = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as e:
            list(reflect(iter([GARBAGE[1]]), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = ch.unary_unary("/lmstack.v1.TokenizerService/CountTokens")(b"\x12\x02hi", timeout=30)
        assert ok == b"\x08\x01"  # count = 1: the server kept serving


def test_concurrent_rpcs_are_bounded_by_the_setting(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(4)]
        for w in watches:
            next(w)  # each holds an RPC open
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for w in watches:
            w.cancel()
