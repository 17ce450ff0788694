"""What Ray Serve's multiplexing builds on, without Ray: a registry that loads fine-tunes only when
asked (``autoload_store=False``), the Ray deployment's health check, and the client's routing
metadata (``application``, ``multiplexed_model_id``) as a real gRPC server receives it."""

from __future__ import annotations

import asyncio
import json
from concurrent import futures

import grpc
import pytest

from services.config import InferenceSettings
from services.errors import InvalidArgument, NotFound
from services.inference.handler import inference_registry
from services.tenants import Tenant
from tests.services.test_adapters import POEM, SQL, publish_adapter

OWNED = "ft:tiny:owned:ccc333"  # team-a's


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_models):
    store = tmp_path_factory.mktemp("on-demand-store")
    publish_adapter(store, SQL, tiny_models["tiny"], "tiny", seed=1, rank=4, targets=("attn.c_attn",))
    publish_adapter(store, POEM, tiny_models["tiny"], "tiny", seed=2, rank=2, targets=("attn.c_attn",))
    publish_adapter(store, OWNED, tiny_models["tiny"], "tiny", seed=3, rank=2, targets=("attn.c_attn",))
    (store / OWNED / "finetune.json").write_text(json.dumps({"tenant": "team-a"}))
    (store / "ft:tiny:broken:000").mkdir()
    (store / "ft:tiny:broken:000" / "adapter_config.json").write_text("{not json")
    return store


def test_registry_loads_and_unloads_store_entries_only_when_asked(tiny_models, store):
    async def main():
        settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(store))
        registry = inference_registry(settings, autoload_store=False)
        await registry.load_all()
        try:
            assert registry.names() == ["tiny"]  # the store is not loaded wholesale
            assert await registry.refresh() == [] and registry.names() == ["tiny"]
            entry = await registry.load_store_entry(SQL)
            assert entry.obj.adapter == SQL and registry.lookup("tiny").obj.engine.adapters() == [SQL]
            assert await registry.load_store_entry(SQL) is entry  # loaded once
            with pytest.raises(NotFound, match="not found"):
                await registry.load_store_entry("ft:tiny:nope:1")
            with pytest.raises(InvalidArgument, match="not a valid name"):
                await registry.load_store_entry("../tiny")
            with pytest.raises(NotFound, match="could not be loaded"):
                await registry.load_store_entry("ft:tiny:broken:000")
            # What a Ray replica checks before loading a fine-tune for a caller: another tenant's model
            # is NOT_FOUND with a missing one's message; a loaded entry carries its owner.
            a, b, admin = Tenant("team-a"), Tenant("team-b"), Tenant("ops", "admin")
            assert registry.check_store_model(OWNED, a) == store / OWNED == registry.check_store_model(OWNED, admin)
            assert registry.check_store_model(SQL, b) == store / SQL  # no owner: everyone's
            with pytest.raises(NotFound) as theirs:
                registry.check_store_model(OWNED, b)
            with pytest.raises(NotFound) as missing:
                registry.check_store_model("ft:tiny:nope:1", b)
            assert str(theirs.value) == str(missing.value).replace("ft:tiny:nope:1", OWNED)
            owned = await registry.load_store_entry(OWNED)
            assert owned.spec.owner == "team-a" and entry.spec.owner == ""
            assert registry.names(b) == ["tiny", SQL] and registry.names(a) == ["tiny", OWNED, SQL]
            assert await registry.unload(OWNED)
            assert not await registry.unload("tiny")  # a configured model stays
            assert await registry.unload(SQL)
            assert registry.names() == ["tiny"] and registry.lookup("tiny").obj.engine.adapters() == []
        finally:
            await registry.close()

    asyncio.run(main())


def test_inference_replica_health_fails_when_an_engine_thread_dies(tiny_models, store):
    pytest.importorskip("ray.serve")
    from deploy.ray_services import Inference

    async def main():
        cls = Inference.func_or_class
        replica = cls.__new__(cls)
        await replica.__init__({"models": f"tiny={tiny_models['tiny']}", "model_store": str(store)})
        try:
            replica.check_health()  # loaded, engines running
            await asyncio.to_thread(replica.registry.lookup("tiny").obj.async_engine.stop)
            with pytest.raises(RuntimeError, match="engine of model 'tiny' stopped"):
                replica.check_health()
        finally:
            replica._export.stop()
            await replica.registry.close()

    asyncio.run(main())


def test_client_sends_rays_routing_metadata_from_the_request_model():
    from services.client import Client
    from services.gen.lmstack.v1 import inference_pb2

    seen = []

    def complete(request, context):
        seen.append((request.model, dict(context.invocation_metadata())))
        return inference_pb2.CompleteResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("lmstack.v1.InferenceService", {
        "Complete": grpc.unary_unary_rpc_method_handler(
            complete, request_deserializer=inference_pb2.CompleteRequest.FromString,
            response_serializer=inference_pb2.CompleteResponse.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", application="lmstack", api_key="k") as c:
            c.complete("hi", model=SQL)
            c.complete("hi")
        with Client(f"127.0.0.1:{port}") as c:
            c.complete("hi", model=SQL)
    finally:
        server.stop(None)
    (m1, md1), (m2, md2), (m3, md3) = seen
    assert md1["application"] == "lmstack" and md1["multiplexed_model_id"] == SQL == m1
    assert md1["authorization"] == "Bearer k"
    assert md2["application"] == "lmstack" and "multiplexed_model_id" not in md2  # the default model
    assert "application" not in md3 and "multiplexed_model_id" not in md3  # plain lmstack serve
