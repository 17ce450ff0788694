"""The shared server stack (``services.server``, ``services.errors``) on real ``grpc.aio`` servers.

One error boundary for the three RPC kinds lmstack serves (unary, server-streaming,
client-streaming) with a service's own registered mapping, and loud port conflicts: a port that is
taken is an error naming ``host:port`` and its holder, never a silently shared socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from services.config import ServiceSettings
from services.errors import InvalidArgument, status_for
from services.server import GrpcServer, PortInUse, check_port_free
from tests.helpers import free_port
from tests.helpers.servers import ServerThread


class StoreDown(Exception):
    """Stands for a dependency's exception type (what ``redis.RedisError`` is to fine-tuning)."""


class StoreTimeout(StoreDown):
    pass


SERVICE = "lmstack.test.Kinds"
MAPPING = {StoreDown: (grpc.StatusCode.UNAVAILABLE, "the store is down, retry shortly: {e}")}


async def unary(request: bytes, context):
    return _outcome(request)


async def server_stream(request: bytes, context):
    yield b"first"
    yield _outcome(request)


async def client_stream(request_iterator, context):
    chunks = [chunk async for chunk in request_iterator]
    return _outcome(chunks[-1])


def _outcome(request: bytes) -> bytes:
    """``b"store"``: a mapped exception; ``b"subclass"``: its subclass; ``b"value"``: a ValueError;
    ``b"bug"``: an unmapped one; anything else is echoed."""
    if request == b"store":
        raise StoreDown("connection refused")
    if request == b"subclass":
        raise StoreTimeout("timed out")
    if request == b"value":
        raise ValueError("bad input, says lmcore")
    if request == b"bug":
        raise KeyError("oops")
    return request


async def kinds_setup(server: GrpcServer):
    server.map_errors(MAPPING)
    server.add_generic_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    })])
    return None, None


@pytest.fixture(scope="module")
def kinds():
    s = ServerThread(ServiceSettings(port=0), "kinds", kinds_setup).start()
    yield s
    s.stop()


def call(channel, kind: str, payload: bytes, timeout: float = 10.0):
    """One RPC of ``kind``; returns its response(s) (a list for the server stream)."""
    method = f"/{SERVICE}/{kind}"
    if kind == "Unary":
        return channel.unary_unary(method)(payload, timeout=timeout)
    if kind == "ServerStream":
        return list(channel.unary_stream(method)(payload, timeout=timeout))
    return channel.stream_unary(method)(iter([b"chunk", payload]), timeout=timeout)


KINDS = ["Unary", "ServerStream", "ClientStream"]


@pytest.mark.parametrize("kind", KINDS)
def test_boundary_maps_every_rpc_kind_with_the_registered_mapping(kinds, kind):
    with grpc.insecure_channel(kinds.target) as channel:
        expected = [b"first", b"ok"] if kind == "ServerStream" else b"ok"
        assert call(channel, kind, b"ok") == expected
        cases = [
            (b"store", grpc.StatusCode.UNAVAILABLE, "the store is down, retry shortly: connection refused"),
            (b"subclass", grpc.StatusCode.UNAVAILABLE, "the store is down, retry shortly: timed out"),
            (b"value", grpc.StatusCode.INVALID_ARGUMENT, "bad input, says lmcore"),
            (b"bug", grpc.StatusCode.INTERNAL, "internal error (KeyError); the server logged the details"),
        ]
        for payload, code, details in cases:
            with pytest.raises(grpc.RpcError) as e:
                call(channel, kind, payload)
            assert (e.value.code(), e.value.details()) == (code, details), payload
        assert call(channel, kind, b"ok") == expected  # the server kept serving
    metrics = generate_latest(kinds.server.metrics_registry).decode()
    for code, n in (("OK", 2), ("UNAVAILABLE", 2), ("INVALID_ARGUMENT", 1), ("INTERNAL", 1)):
        line = f'lmstack_kinds_rpc_requests_total{{code="{code}",method="/{SERVICE}/{kind}"}} {float(n)}'
        assert line in metrics, (line, metrics)


def test_api_key_denial_goes_through_the_boundary_for_every_kind():
    s = ServerThread(ServiceSettings(port=0, api_keys=["k1"]), "kinds", kinds_setup).start()
    try:
        with grpc.insecure_channel(s.target) as channel:
            for kind in KINDS:
                with pytest.raises(grpc.RpcError) as e:
                    call(channel, kind, b"ok")
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details(), kind
        metrics = generate_latest(s.server.metrics_registry).decode()
        for kind in KINDS:
            assert f'code="UNAUTHENTICATED",method="/{SERVICE}/{kind}"}} 1.0' in metrics
    finally:
        s.stop()


def test_status_for_prefers_the_most_specific_mapping_and_service_errors():
    mapping = {StoreDown: grpc.StatusCode.UNAVAILABLE, StoreTimeout: grpc.StatusCode.DEADLINE_EXCEEDED}
    assert status_for(StoreTimeout("slow"), mapping) == (grpc.StatusCode.DEADLINE_EXCEEDED, "slow")
    assert status_for(StoreDown("down"), mapping) == (grpc.StatusCode.UNAVAILABLE, "down")
    assert status_for(StoreDown("down")) == (grpc.StatusCode.INTERNAL,
                                             "internal error (StoreDown); the server logged the details")
    assert status_for(InvalidArgument("no"), mapping) == (grpc.StatusCode.INVALID_ARGUMENT, "no")


def test_two_services_cannot_map_one_exception_two_ways():
    async def main():  # a grpc.aio server is built inside a running loop, as services do
        server = GrpcServer(ServiceSettings(port=0), "kinds")
        server.map_errors(MAPPING)
        server.map_errors(MAPPING)  # the same rule again (a setup run twice) is fine
        with pytest.raises(ValueError, match="StoreDown is already mapped"):
            server.map_errors({StoreDown: grpc.StatusCode.INTERNAL})

    asyncio.run(main())


# --- ports ------------------------------------------------------------------------------------------
def _holder_known() -> bool:
    return Path("/proc/net/tcp").is_file()


def test_a_second_server_on_a_taken_port_fails_naming_it_and_the_first_keeps_it(kinds):
    port = kinds.settings.port
    second = ServerThread(ServiceSettings(port=port), "kinds", kinds_setup)
    with pytest.raises(PortInUse) as e:
        second.start()
    message = str(e.value)
    assert "\n" not in message and f"gRPC port 127.0.0.1:{port} is already in use" in message
    if _holder_known():  # the holder is this very process
        assert f"by pid {os.getpid()} (" in message
    with grpc.insecure_channel(kinds.target) as channel:  # every call still reaches the first server
        assert all(call(channel, "Unary", b"ok") == b"ok" for _ in range(5))


def test_a_taken_metrics_port_fails_before_the_grpc_port_is_bound():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        metrics_port = holder.getsockname()[1]
        grpc_port = free_port()
        s = ServerThread(ServiceSettings(port=grpc_port, metrics_port=metrics_port), "kinds", kinds_setup)
        with pytest.raises(PortInUse) as e:
            s.start()
        assert f"metrics port 127.0.0.1:{metrics_port} is already in use" in str(e.value)
        check_port_free("gRPC", "127.0.0.1", grpc_port)  # nothing was left bound
    ok = ServerThread(ServiceSettings(port=grpc_port, metrics_port=metrics_port), "kinds", kinds_setup).start()
    ok.stop()


def test_check_port_free_accepts_port_zero_and_rejects_a_listener():
    check_port_free("gRPC", "127.0.0.1", 0)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(PortInUse, match=rf"127\.0\.0\.1:{holder.getsockname()[1]}"):
            check_port_free("gRPC", "127.0.0.1", holder.getsockname()[1])
