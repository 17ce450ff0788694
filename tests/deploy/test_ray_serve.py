"""deploy/serve.yaml on a real two-node Ray cluster (``ray.cluster_utils.Cluster``, two raylets on
this machine), through Ray Serve's real gRPC proxy, against the standalone servers as reference.

One module-scoped cluster runs the application from ``deploy/serve.yaml`` itself (loaded by Ray's
``ServeDeploySchema``, deployed as ``serve run`` does), with a test overlay: tiny models, a real
redis-server, short autoscaling delays, one proxy (two proxies on one machine would share a port),
and custom resources that put ``Inference`` and ``FineTuneWorker`` on the second node. The
application has a keys file (an admin, two members; ``ray_client`` speaks as the admin) and serves
the OpenAI-compatible API on Ray's HTTP proxy beside gRPC.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from services.client import Client  # noqa: E402
from services.tenants import hash_key  # noqa: E402
from tests.helpers import ROOT, free_port, gpt2_tokenizer  # noqa: E402
from tests.helpers.models import save_tiny_model  # noqa: E402

# The module's cluster starts in the first test's setup: seven Ray processes importing torch on a
# loaded 2-core machine can take minutes, so the per-test limit is wider here than the suite's.
pytestmark = pytest.mark.timeout(900)

APP = "lmstack"
SQL, POEM, FULL = "ft:tiny:sql:aaa111", "ft:tiny:poem:bbb222", "ft:tiny:full:ccc333"
MODEL_A, MODEL_B = "ft:tiny:a:aaaaaa", "ft:tiny:b:bbbbbb"  # adapters owned by team-a and team-b
PROMPT = "The quick brown fox"
KEYS = {"ops": "lmsk-ray-test-ops", "team-a": "lmsk-ray-test-team-a", "team-b": "lmsk-ray-test-team-b",
        "team-q": "lmsk-ray-test-team-q"}
ROLES = {"ops": "admin", "team-a": "member", "team-b": "member", "team-q": "member"}
QUOTAS = {"team-q": {"concurrent_requests": 1}}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def serve_yaml() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())


def deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def overlay_config(grpc_port: int, http_port: int, args: dict) -> dict:
    """deploy/serve.yaml with the test overlay (what an operator edits is what the test runs)."""
    config = copy.deepcopy(serve_yaml())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    config["grpc_options"]["port"] = grpc_port
    config["applications"][0]["args"].update(args)
    deployment(config, "Gateway")["num_replicas"] = 1
    inference = deployment(config, "Inference")
    inference["autoscaling_config"].update(min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                           upscale_delay_s=1, downscale_delay_s=3, look_back_period_s=2)
    inference["ray_actor_options"] = {"num_cpus": 1, "resources": {"second_node": 1}}
    inference["health_check_period_s"] = 1
    tokenizer = deployment(config, "Tokenizer")
    tokenizer.pop("autoscaling_config")
    tokenizer["num_replicas"] = 1
    for name in ("Gateway", "Tokenizer", "FineTuning"):
        d = deployment(config, name)
        d["ray_actor_options"] = {**d["ray_actor_options"], "resources": {"head_node": 1}}
    worker = deployment(config, "FineTuneWorker")
    worker["ray_actor_options"] = {"num_cpus": 1, "resources": {"second_node": 1}}
    worker["health_check_period_s"] = 1
    for d in config["applications"][0]["deployments"]:  # a stopping replica is checked for idleness
        d["graceful_shutdown_wait_loop_s"] = 0.2         # every 0.2 s, not 2 s (scale-down, teardown)
    return config


def start_two_nodes(attempts: int = 5):
    """A head and a second raylet on this machine. Ray gives a raylet a fixed 30 s to register with
    the GCS, which an overloaded machine can miss: then start over (a fresh cluster, same config)."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=8, resources={"head_node": 100}, include_dashboard=False,
                             object_store_memory=150 * 1024 * 1024,
                             # no idle workers prestarted per logical CPU: 16 Python processes at once
                             # would only slow the raylets' start on 2 cores
                             _system_config={"metrics_report_interval_ms": 1000, "enable_worker_prestart": False})
            cluster.add_node(num_cpus=8, resources={"second_node": 100}, object_store_memory=150 * 1024 * 1024)
            return cluster
        except Exception:
            cluster.shutdown()
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from deploy.ray_serve import run_config
    from tests.conftest import RedisServer
    from tests.services.test_adapters import publish_adapter

    root = tmp_path_factory.mktemp("ray")
    tok = gpt2_tokenizer()
    base = save_tiny_model(root / "tiny", 0, tok, block_size=1024)  # room for long streams
    store = root / "store"
    store.mkdir()
    publish_adapter(store, SQL, base, "tiny", seed=1, rank=4, targets=("attn.c_attn",))
    publish_adapter(store, POEM, base, "tiny", seed=2, rank=2, targets=("attn.c_attn", "mlp.c_fc"))
    save_tiny_model(store / FULL, 3, tok)
    for name, tenant, seed in ((MODEL_A, "team-a", 4), (MODEL_B, "team-b", 5)):
        publish_adapter(store, name, base, "tiny", seed=seed, rank=2, targets=("attn.c_attn",))
        (store / name / "finetune.json").write_text(json.dumps({"tenant": tenant}))
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    keys_file = root / "api-keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": {hash_key(k): {"tenant": t, "role": ROLES[t], "quotas": QUOTAS.get(t, {})}
                                                  for t, k in KEYS.items()}}))
    (root / "redis").mkdir()
    redis = RedisServer(root / "redis")
    redis.start()

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
           # replicas and handles report their load for autoscaling every 0.5 s (Ray's knobs for it)
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the raylets (and so every Ray process) inherit this environment
    cluster = start_two_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    port, http_port = free_port(), free_port()
    args = {"models": f"tiny={base}", "model_store": str(store), "redis_url": redis.url, "max_models_per_replica": 2,
            "reclaim_idle_s": 1.5, "max_batch_size": 8, "max_waiting": 16, "api_keys_file": str(keys_file)}
    try:
        run_config(overlay_config(port, http_port, args), timeout_s=300)
        s = type("Stack", (), {})()
        s.addr, s.base, s.store, s.tok, s.redis, s.cluster, s.args = f"127.0.0.1:{port}", base, store, tok, redis, \
            cluster, args
        s.http = f"http://127.0.0.1:{http_port}"
        wait_for_app(s.addr)
        yield s
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        redis.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_client(addr: str, tenant: str = "ops", **kw) -> Client:
    return Client(addr, application=APP, timeout=120, api_key=KEYS[tenant], **kw)


def ray_finetune_client(addr: str, tenant: str = "ops", **kw):
    from services.finetune.client import FineTuneClient

    return FineTuneClient(addr, application=APP, api_key=KEYS[tenant], **kw)


def openai_client(stack, tenant: str = "ops", **kw):
    import openai

    return openai.OpenAI(base_url=stack.http + "/v1", api_key=kw.pop("api_key", KEYS[tenant]), max_retries=0,
                         timeout=120, **kw)


def wait_for_app(addr: str, timeout: float = 120.0) -> None:
    """The proxy learns about the application a moment after it is RUNNING."""
    deadline = time.monotonic() + timeout
    with ray_client(addr) as c:
        while True:
            try:
                c.list_models(timeout=60)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def replicas(deployment_name: str) -> list:
    """The deployment's live replica actors (name, node_id, actor_id), from the GCS actor table
    (the ``ray.util.state`` API would need the dashboard running)."""
    from types import SimpleNamespace

    from ray._private.state import actors

    return [SimpleNamespace(name=a["Name"], node_id=a["Address"]["NodeID"], actor_id=a["ActorID"])
            for a in actors().values()
            if a["ActorClassName"] == f"ServeReplica:{APP}:{deployment_name}" and a["State"] == "ALIVE"]


def running_replicas(deployment_name: str) -> int:
    status = serve.status().applications[APP].deployments[deployment_name]
    return status.replica_states.get("RUNNING", 0)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rpc_error(fn, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code(), e.value.details()


# --- the config ----------------------------------------------------------------------------------
def test_serve_yaml_is_a_ray_serve_config_whose_imports_resolve():
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from deploy.ray_serve import GRPC_SERVICER_FUNCTIONS, Gateway, build_app

    config = ServeDeploySchema.model_validate(serve_yaml())
    assert config.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    for path in config.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(path))
    (app,) = config.applications
    assert import_attr(app.import_path.replace(":", ".")) is build_app
    assert {d.name for d in app.deployments} == {"Gateway", "Inference", "Tokenizer", "FineTuning",
                                                 "FineTuneWorker"}
    inference = next(d for d in app.deployments if d.name == "Inference")
    assert inference.autoscaling_config["min_replicas"] < inference.autoscaling_config["max_replicas"]
    assert build_app(app.args)._bound_deployment.func_or_class is Gateway.func_or_class  # args validate
    with pytest.raises(Exception, match="max_batch_size"):
        build_app({**app.args, "max_batch_size": 0})


# --- two nodes, same answers, same status codes ----------------------------------------------------
def test_deployments_span_two_nodes_and_answer_like_lmcore(stack):
    from lmcore import SamplingParams, generate, load_model

    nodes = {d: {a.node_id for a in replicas(d)} for d in ("Gateway", "Tokenizer", "Inference", "FineTuning",
                                                            "FineTuneWorker")}
    assert all(nodes.values()), nodes
    assert len(set().union(*nodes.values())) == 2, nodes
    assert nodes["Inference"].isdisjoint(nodes["Tokenizer"])

    expected = generate(load_model(stack.base), [stack.tok.encode(PROMPT)],
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    with ray_client(stack.addr) as c:
        r = c.complete(PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
        assert list(r.token_ids) == expected.token_ids and r.usage.completion_tokens == 12
        chunks = list(c.complete_stream(PROMPT, max_tokens=12, temperature=0, ignore_eos=True))
        assert [t for ch in chunks for t in ch.token_ids] == expected.token_ids
        assert "".join(ch.text for ch in chunks) == r.text and chunks[-1].finish_reason == r.finish_reason
        assert c.encode(PROMPT) == stack.tok.encode(PROMPT)
        assert c.decode(stack.tok.encode(PROMPT)) == PROMPT
        assert c.count_tokens(PROMPT) == len(stack.tok.encode(PROMPT))
        assert c.score("The sky is", [" blue", " green"]).best in (0, 1)
        inspected = c.inspect(PROMPT, top_k=3)
        assert [t.id for t in inspected.tokens] == stack.tok.encode(PROMPT) and inspected.n_layer == 2
        models = {m.name: m for m in c.list_models()}
        assert models["tiny"].is_default and models["tiny"].context_length == 1024
        assert {SQL, POEM, FULL} <= set(models) and models[SQL].base_model == "tiny"


BAD_CALLS = {
    "negative temperature": lambda c: c.complete("hi", temperature=-1),
    "unknown model": lambda c: c.complete("hi", model="nope"),
    "empty prompt": lambda c: c.complete(""),
    "past the context": lambda c: c.complete("hi", max_tokens=100_000),
    "stream, unknown model": lambda c: list(c.complete_stream("hi", model="nope")),
    "stream, bad top_p": lambda c: list(c.complete_stream("hi", top_p=2.0)),
    "no choices": lambda c: c.score("ctx", []),
    "decode out of range": lambda c: c.decode([10 ** 6]),
    "tokenizer, unknown model": lambda c: c.encode("hi", model="nope"),
}


def test_status_codes_equal_the_standalone_servers(stack):
    from services.config import InferenceSettings, TokenizerSettings
    from services.inference.__main__ import setup as inference_setup
    from services.tokenizer.__main__ import setup as tokenizer_setup
    from tests.helpers.servers import ServerThread

    models = [f"tiny={stack.base}"]
    inference = ServerThread(InferenceSettings(models=models, port=0), "inference", inference_setup).start()
    tokenizer = ServerThread(TokenizerSettings(models=models, port=0), "tokenizer", tokenizer_setup).start()
    try:
        with ray_client(stack.addr) as ray_c, Client(inference.target) as inf, Client(tokenizer.target) as tok:
            for what, call in BAD_CALLS.items():
                local = tok if "tokenizer" in what or "decode" in what else inf
                expected, got = rpc_error(call, local), rpc_error(call, ray_c)
                if "unknown model" in what:  # Ray's replicas also name the model store's fine-tunes
                    assert got[0] == expected[0] and got[1].startswith("model 'nope' not found"), what
                else:
                    assert got == expected, what
            assert ray_c.complete("hi", max_tokens=2).usage.completion_tokens == 2  # still serving
    finally:
        inference.stop()
        tokenizer.stop()
    with ray_finetune_client(stack.addr) as ft:
        code, details = rpc_error(ft.get_job, "ftjob-000000000000")
        assert code == grpc.StatusCode.NOT_FOUND and "ftjob-000000000000" in details
        code, details = rpc_error(ft.get_job, "nope")
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, details = rpc_error(lambda: ft.upload_dataset(b'{"prompt": 1}\n'))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "line 1" in details


def test_inspect_through_ray_matches_lmcore(stack):
    from lmcore import inspect_tokens, load_model
    from services.inference.inspection import unpack_attention

    ref = inspect_tokens(load_model(stack.base), stack.tok.encode(PROMPT), top_k=3, layers=[1])
    with ray_client(stack.addr) as c:
        r = c.inspect(PROMPT, top_k=3, attention=True, layers=[1])
        assert [t.id for t in r.tokens] == stack.tok.encode(PROMPT)
        assert abs(unpack_attention(r.attention[0]) - ref.attention[1].numpy()).max() < 1e-3
        with pytest.raises(grpc.RpcError) as e:
            c.inspect(PROMPT, attention=True, layers=[5])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layer 5 does not exist" in e.value.details()


# --- fine-tunes multiplexed over replicas -----------------------------------------------------------
def test_fine_tunes_are_multiplexed_with_an_lru_per_replica(stack):
    from services.config import InferenceSettings
    from services.inference.__main__ import setup
    from tests.helpers.servers import ServerThread

    local = ServerThread(InferenceSettings(models=[f"tiny={stack.base}"], model_store=str(stack.store), port=0),
                         "inference", setup).start()
    try:
        with Client(local.target) as c:
            expected = {m: list(c.complete(PROMPT, model=m, max_tokens=10, temperature=0,
                                           ignore_eos=True).token_ids) for m in ("tiny", SQL, POEM, FULL)}
    finally:
        local.stop()
    assert len({tuple(v) for v in expected.values()}) == 4  # each fine-tune changes the answer

    inference = serve.get_deployment_handle("Inference", app_name=APP)
    with ray_client(stack.addr) as c:
        for model in (SQL, POEM, FULL, SQL):  # FULL evicts SQL (2 per replica), then SQL reloads
            got = c.complete(PROMPT, model=model, max_tokens=10, temperature=0, ignore_eos=True)
            assert list(got.token_ids) == expected[model], model
            assert list(c.complete(PROMPT, max_tokens=10, temperature=0, ignore_eos=True).token_ids) \
                == expected["tiny"]
        held = wait_until(lambda: (lambda m: m if len(m) <= 3 else None)(
            inference.loaded_models.remote().result(timeout_s=60)), 60, "the LRU to unload the evicted model")
        assert held[0] == "tiny" and SQL in held and FULL in held and POEM not in held, held


# --- the OpenAI-compatible API through Ray's HTTP proxy ---------------------------------------------
def test_openai_api_through_rays_http_proxy_answers_like_grpc(stack):
    """The real ``openai`` client against Serve's HTTP proxy: the same handler calls as gRPC, so the
    same text, the same errors (in OpenAI's shape), and a stream a client leaves is aborted."""
    import openai

    from lmcore import SamplingParams, generate, load_model
    from lmcore.tokenizer.chat_template import ChatTemplate

    client = openai_client(stack)
    assert {"tiny", SQL, POEM, FULL, MODEL_A, MODEL_B} <= {m.id for m in client.models.list().data}
    assert client.models.retrieve("tiny").max_model_len == 1024

    expected = generate(load_model(stack.base), [stack.tok.encode(PROMPT)],
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    greedy = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    with ray_client(stack.addr) as c:
        grpc_text = c.complete(PROMPT, max_tokens=12, temperature=0, ignore_eos=True).text
        tuned_text = c.complete(PROMPT, model=SQL, max_tokens=12, temperature=0, ignore_eos=True).text
        bad_grpc = rpc_error(lambda: c.complete("hi", max_tokens=100_000))
        unknown_grpc = rpc_error(lambda: c.complete("hi", model="nope"))
    assert grpc_text == stack.tok.decode(expected.token_ids)
    r = client.completions.create(model="tiny", prompt=PROMPT, **greedy)
    assert r.choices[0].text == grpc_text and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True, **greedy))
    assert len(chunks) > 2 and "".join(ch.choices[0].text for ch in chunks if ch.choices) == grpc_text
    assert client.completions.create(model=SQL, prompt=PROMPT, **greedy).choices[0].text == tuned_text  # multiplexed

    # chat: the model directory's template, rendered in the gateway, crossed from the replica
    messages = [{"role": "user", "content": "Say hi"}]
    rendered = ChatTemplate.from_dir(stack.base).render(messages, True)
    chat = client.chat.completions.create(model="tiny", messages=messages, **greedy)
    assert chat.choices[0].message.content == client.completions.create(model="tiny", prompt=rendered,
                                                                        **greedy).choices[0].text

    # errors: in the gateway (the request's shape) and in the replica (the handler's), same messages as gRPC
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.body["message"] == unknown_grpc[1] and unknown_grpc[0] == grpc.StatusCode.NOT_FOUND
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=100_000)
    assert e.value.body["message"] == bad_grpc[1] and bad_grpc[0] == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, top_p=2.0, stream=True)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, best_of=3)

    # A client that goes away mid-stream: the replica's engine aborts its request.
    inference = serve.get_deployment_handle("Inference", app_name=APP)

    def stats() -> dict:
        return inference.engine_stats.remote().result(timeout_s=60)["tiny"]

    aborted = stats()["requests_aborted"]
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    stream.close()
    final = wait_until(lambda: (lambda st: st if st["running"] == 0 and st["requests_aborted"] == aborted + 1
                                else None)(stats()), 60, "the engine to abort the stream of a client that left")
    assert final["waiting"] == 0
    assert client.completions.create(model="tiny", prompt=PROMPT, **greedy).choices[0].text == grpc_text


# --- fine-tuning on Ray --------------------------------------------------------------------------------
def test_fine_tuning_on_ray_survives_a_killed_worker_and_is_served(stack):
    import torch
    from safetensors.torch import load_file

    from lmcore import SamplingParams, generate, load_model
    from lmcore.lora import load_adapter_model
    from services.gen.lmstack.v1 import finetune_pb2 as pb

    records = [{"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}"} for a, b in
               ((i % 7 + 1, i % 5 + 2) for i in range(32))]
    hp = dict(max_steps=24, learning_rate=1e-2, batch_size=4, lora_rank=4, checkpoint_interval=4, log_interval=1,
              lora_dropout=0.1, seed=7)
    with ray_finetune_client(stack.addr, timeout=120) as ft:
        ds = ft.upload_dataset(("\n".join(json.dumps(r) for r in records) + "\n").encode(), chunk_bytes=200)
        assert ds.examples == 32
        job = ft.create_job("tiny", ds.id, method="LORA", suffix="crash", **hp)
        (victim,) = replicas("FineTuneWorker")
        for event in ft.watch_job(job.id, timeout=300):
            if event.type == pb.JOB_EVENT_TYPE_CHECKPOINT and event.checkpoint.step >= 8:
                ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
                break
        running = ft.get_job(job.id)
        assert running.status == pb.JOB_STATUS_RUNNING and running.worker.startswith("ray-")
        assert running.step < 24

        done = ft.wait(job.id, timeout=300)
        events = list(ft.watch_job(job.id, timeout=60))
        statuses = [e.status for e in events if e.type == pb.JOB_EVENT_TYPE_STATUS]
        assert statuses.count(pb.JOB_STATUS_SUCCEEDED) == 1 and statuses[-1] == pb.JOB_STATUS_SUCCEEDED
        assert done.attempt == 2 and done.worker != running.worker  # Serve's replacement replica took it over
        assert victim.actor_id not in {a.actor_id for a in replicas("FineTuneWorker")}

        again = ft.wait(ft.create_job("tiny", ds.id, method="LORA", suffix="clean", **hp).id, timeout=300)
        assert again.status == pb.JOB_STATUS_SUCCEEDED and again.attempt == 1
    a = load_file(str(stack.store / done.fine_tuned_model / "adapter_model.safetensors"))
    b = load_file(str(stack.store / again.fine_tuned_model / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The fine-tune -> serve loop: the published adapter answers through the proxy, no restart.
    base = load_model(stack.base)
    tuned = load_adapter_model(base, stack.store / done.fine_tuned_model)
    prompt = records[0]["prompt"]
    expected = generate(tuned, [base.tokenizer.encode(prompt)],
                        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), tokenizer=base.tokenizer)[0]
    with ray_client(stack.addr) as c:
        got = c.complete(prompt, model=done.fine_tuned_model, max_tokens=6, temperature=0, ignore_eos=True)
        assert list(got.token_ids) == list(expected.token_ids)


# --- tenants: the standalone servers' keys and rules, on Ray ---------------------------------------
def a_complete_works(c: Client) -> bool:
    try:
        return c.complete("hi", max_tokens=2).usage.completion_tokens == 2
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False


def test_tenants_on_ray_authenticate_scope_and_hide(stack):
    """The keys file of the application args: no valid key is UNAUTHENTICATED (HTTP 401); members see
    the shared models plus their own, another tenant's model, job or dataset is NOT_FOUND with the
    message an unknown one gets; the admin sees everything. gRPC and HTTP alike."""
    import openai

    from services.gen.lmstack.v1 import finetune_pb2 as pb

    for key in (None, "lmsk-not-a-key"):
        with Client(stack.addr, application=APP, api_key=key, timeout=60) as anon:
            for call in (anon.list_models, lambda: anon.complete("hi", max_tokens=2), lambda: anon.encode("hi"),  # noqa: B023
                         lambda: list(anon.complete_stream("hi", max_tokens=2))):  # noqa: B023
                assert rpc_error(call)[0] == grpc.StatusCode.UNAUTHENTICATED
        with ray_finetune_client(stack.addr, timeout=60) as ft:
            ft_anon = type(ft)(stack.addr, application=APP, api_key=key, timeout=60)
        with ft_anon:
            assert rpc_error(ft_anon.list_jobs)[0] == grpc.StatusCode.UNAUTHENTICATED
            assert rpc_error(lambda: ft_anon.upload_dataset(b'{"prompt": "a", "completion": "b"}\n'))[0] \
                == grpc.StatusCode.UNAUTHENTICATED  # noqa: B023
    with pytest.raises(openai.AuthenticationError):
        openai_client(stack, api_key="lmsk-not-a-key").models.list()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(stack.http + "/v1/models", timeout=60)
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"

    shared = {"tiny", SQL, POEM, FULL}
    clients = {t: ray_client(stack.addr, t) for t in KEYS}
    try:
        a, b, ops = clients["team-a"], clients["team-b"], clients["ops"]
        assert {m.name for m in a.list_models()} == shared | {MODEL_A}
        assert {m.name for m in b.list_models()} == shared | {MODEL_B}
        owners = {m.name: m.tenant for m in ops.list_models()}
        assert owners[MODEL_A] == "team-a" and owners[MODEL_B] == "team-b"
        unknown = rpc_error(lambda: a.complete("hi", model="ft:tiny:x:nope00", max_tokens=2))
        for me, mine, theirs in ((a, MODEL_A, MODEL_B), (b, MODEL_B, MODEL_A)):
            for call in (lambda m: me.complete("hi", model=m, max_tokens=2),  # noqa: B023
                         lambda m: list(me.complete_stream("hi", model=m, max_tokens=2)),  # noqa: B023
                         lambda m: me.score("The sky is", [" blue"], model=m)):  # noqa: B023
                code, details = rpc_error(call, theirs)
                assert (code, details) == (unknown[0], unknown[1].replace("ft:tiny:x:nope00", theirs))
            assert me.complete("hi", model=mine, max_tokens=2).usage.completion_tokens == 2
            assert me.encode("hi", model=mine) == stack.tok.encode("hi")
            assert rpc_error(lambda: me.encode("hi", model=theirs))[0] == grpc.StatusCode.NOT_FOUND  # noqa: B023
        for m in (MODEL_A, MODEL_B):
            assert ops.complete("hi", model=m, max_tokens=2).usage.completion_tokens == 2
        # DeleteModel: another's is NOT_FOUND (and stays), the owner's goes from the store and the lists
        assert rpc_error(lambda: b.delete_model(MODEL_A))[0] == grpc.StatusCode.NOT_FOUND
        assert a.delete_model(MODEL_A).name == MODEL_A and not (stack.store / MODEL_A).exists()
        assert MODEL_A not in {m.name for m in ops.list_models()}
        assert rpc_error(lambda: a.complete("hi", model=MODEL_A, max_tokens=2))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        for c in clients.values():
            c.close()

    # HTTP: /v1/models per key; another tenant's model is a 404
    assert {m.id for m in openai_client(stack, "team-b").models.list().data} == shared | {MODEL_B}
    assert {m.owned_by for m in openai_client(stack, "ops").models.list().data if m.id == MODEL_B} == {"team-b"}
    with pytest.raises(openai.NotFoundError):
        openai_client(stack, "team-a").completions.create(model=MODEL_B, prompt="hi", max_tokens=2)
    assert openai_client(stack, "team-b").completions.create(model=MODEL_B, prompt="hi", max_tokens=2).choices

    # A quota: the tenant reaches the replica with its quotas, and the handler counts them (per replica)
    with ray_client(stack.addr, "team-q") as q:
        stream = q.complete_stream(PROMPT, max_tokens=1000, ignore_eos=True)
        next(stream)
        code, details = rpc_error(lambda: q.complete("hi", max_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent_requests" in details, details
        with pytest.raises(openai.RateLimitError, match="concurrent_requests"):
            openai_client(stack, "team-q").completions.create(model="tiny", prompt="hi", max_tokens=2)
        with ray_client(stack.addr, "team-b") as other:
            assert a_complete_works(other)  # another tenant is not limited
        stream.cancel()
        wait_until(lambda: a_complete_works(q), 30, "team-q's quota to free after its stream was cancelled")

    # Fine-tuning: datasets and jobs are their owner's (and the admin's)
    data = "".join(json.dumps({"prompt": f"Q{i}:", "completion": f" {i}"}) + "\n" for i in range(8)).encode()
    with ray_finetune_client(stack.addr, "team-a", timeout=60) as fa, \
            ray_finetune_client(stack.addr, "team-b", timeout=60) as fb, ray_finetune_client(stack.addr, timeout=60) as fo:
        ds = fa.upload_dataset(data)
        job = fa.create_job("tiny", ds.id, method="LORA", suffix="mine", max_steps=2, batch_size=2, lora_rank=2)
        fa.cancel_job(job.id)
        def listed(ft) -> set[str]:
            return {j.id for j in ft.list_jobs(page_size=100).jobs}

        assert fa.get_job(job.id).id == job.id and job.id in listed(fa)
        assert job.id not in listed(fb) and job.id in listed(fo)
        missing = rpc_error(fb.get_job, "ftjob-000000000000")
        assert rpc_error(fb.get_job, job.id) == (missing[0], missing[1].replace("ftjob-000000000000", job.id))
        assert rpc_error(fb.get_dataset, ds.id)[0] == grpc.StatusCode.NOT_FOUND
        assert rpc_error(fb.cancel_job, job.id)[0] == grpc.StatusCode.NOT_FOUND
        assert fo.get_dataset(ds.id).id == ds.id
        assert fa.wait(job.id, timeout=120).status == pb.JOB_STATUS_CANCELLED


# --- autoscaling and replica loss ---------------------------------------------------------------------
def stream_tokens(addr: str, max_tokens: int, first: threading.Event | None = None) -> tuple[int, object]:
    """(tokens received, None or the grpc status code the stream ended with)."""
    n = 0
    with ray_client(addr) as c:
        try:
            for chunk in c.complete_stream(PROMPT, max_tokens=max_tokens, temperature=0, ignore_eos=True):
                n += len(chunk.token_ids)
                if first is not None:
                    first.set()
            return n, None
        except grpc.RpcError as e:
            return n, e.code()


LONG = 1000  # tokens: streams that are still running when a replica is killed


def test_autoscaling_up_and_down_and_a_lost_replica_fails_fast(stack):
    assert running_replicas("Inference") == 1
    stop = threading.Event()
    results: list = []

    def burst():
        while not stop.is_set():
            results.append(stream_tokens(stack.addr, 48))

    with ThreadPoolExecutor(16) as pool:
        try:
            bursts = [pool.submit(burst) for _ in range(8)]
            wait_until(lambda: running_replicas("Inference") == 2, 180, "Inference to scale up to 2 replicas")
            actors = {r.name: ray.get_actor(r.name, namespace="serve") for r in replicas("Inference")}
            # Long streams on both replicas, then at once (on a quiet machine 1000 tokens take ~2 s) kill
            # the busier replica: its streams end UNAVAILABLE at once, the others finish.
            firsts = [threading.Event() for _ in range(8)]
            long = [pool.submit(stream_tokens, stack.addr, LONG, f) for f in firsts]
            wait_until(lambda: all(f.is_set() for f in firsts), 120, "every long stream's first token", interval=0.05)
            ongoing = {name: ray.get(a.get_num_ongoing_requests.remote(), timeout=60) for name, a in actors.items()}
            victim = max(ongoing, key=ongoing.get)
            assert ongoing[victim] > 0, ongoing
            before_kill = len(results)
            ray.kill(actors[victim], no_restart=True)
        finally:
            stop.set()
        for f in bursts:
            f.result(timeout=120)
        outcomes = [f.result(timeout=120) for f in long]
    # None failed scaling up; burst streams in flight at the kill finished or ended UNAVAILABLE.
    assert before_kill and all(code is None and n == 48 for n, code in results[:before_kill]), results
    assert all((code is None and n == 48) or code == grpc.StatusCode.UNAVAILABLE for n, code in results[before_kill:])
    lost = [(n, code) for n, code in outcomes if code is not None]
    assert lost and all(code == grpc.StatusCode.UNAVAILABLE and n < LONG for n, code in lost), outcomes
    assert all(n == LONG for n, code in outcomes if code is None)
    with ray_client(stack.addr) as c:  # new calls go to the remaining replica
        assert c.complete(PROMPT, max_tokens=4).usage.completion_tokens == 4

    # Idle (a trickle of single requests): back to one replica, without a failed request.
    trickle = []
    with ray_client(stack.addr) as c:
        def one_and_check():
            trickle.append(c.complete(PROMPT, max_tokens=4, ignore_eos=True).usage.completion_tokens)
            return running_replicas("Inference") == 1 and len(replicas("Inference")) == 1
        wait_until(one_and_check, 180, "Inference to scale back to 1 replica", interval=1.0)
    assert trickle and all(n == 4 for n in trickle)


# --- metrics through Ray's export -----------------------------------------------------------------------
def test_lmstack_metrics_reach_rays_metrics_export(stack):
    def scrape() -> str:
        text = ""
        for node in ray.nodes():
            if node["Alive"]:
                url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
                text += urllib.request.urlopen(url, timeout=10).read().decode()
        return text

    with ray_client(stack.addr) as c:
        c.complete(PROMPT, max_tokens=4)
    text = wait_until(lambda: (lambda t: t if "ray_lmstack_inference_generation_tokens_total" in t
                               and "ray_lmstack_finetune_worker_optimizer_steps_total" in t else None)(scrape()),
                      90, "lmstack metrics in Ray's export", interval=2.0)
    assert "ray_lmstack_inference_time_to_first_token_seconds_bucket" in text
    assert "ray_serve_num_router_requests" in text or "ray_serve_deployment_request_counter" in text
    tokens = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ray_lmstack_inference_generation_tokens_total{")]
    assert tokens and sum(tokens) > 0


def test_prometheus_scrape_config_for_ray_is_valid():
    """deploy/prometheus/ray.yml, checked by the real promtool, follows Ray's service-discovery file."""
    import subprocess

    from tests.helpers.prometheus import prometheus_binary

    out = subprocess.run([prometheus_binary("promtool"), "check", "config", "ray.yml"], capture_output=True,
                         text=True, cwd=ROOT / "deploy" / "prometheus")
    assert out.returncode == 0, out.stdout + out.stderr
    (job,) = yaml.safe_load((ROOT / "deploy" / "prometheus" / "ray.yml").read_text())["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


# --- the Ray dashboards on a real Prometheus scraping the cluster ---------------------------------------
def tokenizer_calls(c: Client) -> None:
    c.count_tokens(PROMPT)
    c.decode(c.encode(PROMPT))


def test_ray_dashboards_show_data_from_prometheus_scraping_the_cluster(stack, tmp_path):
    """deploy/prometheus/ray.yml's job pointed at the nodes' metrics export ports (this cluster runs no
    dashboard, so no service-discovery file), some traffic and a fine-tuning job, then every panel
    query of both Ray dashboards returns data. The job-store gauges equal the store's own counts; the
    per-job loss panel shows the job's reported losses, and the job's series end with it."""
    import math

    from services.gen.lmstack.v1 import finetune_pb2 as pb
    from tests.helpers.prometheus import PrometheusServer, dashboard_targets, substitute

    (job,) = yaml.safe_load((ROOT / "deploy" / "prometheus" / "ray.yml").read_text())["scrape_configs"]
    nodes = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
    prom = PrometheusServer(tmp_path, {job["job_name"]: nodes}).start()
    started = time.time()
    try:
        prom.wait_for(f'count(up{{job="{job["job_name"]}"}} == 1) == {len(nodes)}')
        # Scraped once before the traffic: a counter first seen already moved shows no rate.
        prom.wait_for("ray_lmstack_inference_generation_tokens_total")
        with ray_client(stack.addr) as c:
            shared = "the dashboards' shared prefix: " + " ".join(f"w{i}" for i in range(40))
            for suffix in (" one", " two"):  # the second reuses the first's cached prefix blocks
                c.complete(shared + suffix, max_tokens=4)
            list(c.complete_stream(PROMPT, max_tokens=8))
            stream = c.complete_stream(PROMPT, max_tokens=500, ignore_eos=True)
            next(stream)
            stream.cancel()
            rpc_error(lambda: c.complete("hi", temperature=-1))
            tokenizer_calls(c)

        records = [{"prompt": f"Q: {a} times {b}?\nA:", "completion": f" {a * b}"} for a, b in
                   ((i % 6 + 2, i % 4 + 3) for i in range(24))]
        with ray_finetune_client(stack.addr, timeout=120) as ft:
            ds = ft.upload_dataset(("\n".join(json.dumps(r) for r in records) + "\n").encode())
            running = ft.create_job("tiny", ds.id, method="LORA", suffix="dash", max_steps=5000, batch_size=4,
                                    lora_rank=4, eval_interval=2, log_interval=1, learning_rate=1e-3)
            # The running job's series (read from Redis by FineTuning), scraped while it runs.
            this_job = f'{{job_id="{running.id}"}}'
            prom.wait_for(f"ray_lmstack_finetune_job_eval_loss{this_job}", timeout=180)
            prom.wait_for(f"ray_lmstack_finetune_job_step{this_job} > 4", timeout=120)
            ft.cancel_job(running.id)
            assert ft.wait(running.id, timeout=300).status == pb.JOB_STATUS_CANCELLED
            events = list(ft.watch_job(running.id, timeout=60))
            statuses = [pb.JobStatus.Name(j.status).removeprefix("JOB_STATUS_").lower()
                        for j in ft.list_jobs(page_size=100).jobs]
        ended = time.time()
        with ray_client(stack.addr) as c:  # again: a series first seen at its first call has no rate yet
            tokenizer_calls(c)

        for path in sorted((ROOT / "deploy" / "grafana" / "dashboards" / "ray").glob("*.json")):
            dash = json.loads(path.read_text())
            span = f"{int(time.time() - started) + 60}s"
            pending = [(p["title"], t["refId"], substitute(t["expr"], dash, "20s", span))
                       for p, t in dashboard_targets(dash)]
            deadline = time.monotonic() + 90
            while pending and time.monotonic() < deadline:
                pending = [(title, ref, expr) for title, ref, expr in pending
                           if not any(math.isfinite(float(v)) for s in prom.query_range(expr, started, time.time())
                                      for _, v in s["values"])]
                if pending:
                    time.sleep(1)
            assert not pending, f"{path.name}: queries without data:\n" + "\n".join(map(repr, pending))

        # Jobs by status: every FineTuning replica exports the store's own counts.
        want = {s: statuses.count(s) for s in set(statuses)}
        wait_until(lambda: {s["metric"]["status"]: int(float(s["value"][1]))
                            for s in prom.query("max by (status) (ray_lmstack_finetune_jobs)")
                            if float(s["value"][1])} == want, 60, f"jobs by status to equal the store's {want}")
        # The per-job loss panel: the losses the job reported, one series for it whatever the replicas.
        losses = {e.metrics.loss for e in events if e.type == pb.JOB_EVENT_TYPE_METRICS}
        training = json.loads((ROOT / "deploy/grafana/dashboards/ray/lmstack-training-ray.json").read_text())
        (expr,) = [t["expr"] for p, t in dashboard_targets(training) if p["title"] == "Training loss per job"]
        series = [s for s in prom.query_range(expr, started, ended) if s["metric"]["job_id"] == running.id]
        seen = [float(v) for s in series for _, v in s["values"]]
        assert len(series) == 1 and seen, series
        assert all(any(math.isclose(v, r, rel_tol=1e-6) for r in losses) for v in seen), (seen, losses)
        # Ended: its series leave Ray's export (and so Prometheus), as on a standalone /metrics.
        prom.wait_for(f"absent(ray_lmstack_finetune_job_step{this_job})", timeout=60)
    finally:
        prom.stop()


def metrics_export_samples(prefix: str) -> dict:
    """{(name, labels without Ray's): value} of every node's metrics export, for names from ``prefix``."""
    from prometheus_client.parser import text_string_to_metric_families

    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "otel_scope_name",
                  "otel_scope_schema_url", "otel_scope_version"}
    out = {}
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name.startswith(prefix):
                        out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ray_labels)))] = \
                            s.value
    return out


def test_ray_metrics_export_drops_the_series_a_registry_no_longer_has(stack):
    """deploy/ray_metrics.py from this driver (a Ray worker process like a replica) into Ray's real
    export: a counter, a gauge and a per-job gauge appear; removed from the registry, all three
    leave the export (Ray has no call for that: the mirror's NaN does it), the others stay."""
    from prometheus_client import CollectorRegistry, Counter, Gauge

    from deploy.ray_metrics import RayMetricsExport

    registry = CollectorRegistry()
    events = Counter("lmstack_mirror_test_events", "test", ["model"], registry=registry)
    level = Gauge("lmstack_mirror_test_level", "test", ["model"], registry=registry)
    per_job = Gauge("lmstack_mirror_test_job_level", "test", ["job_id"], registry=registry)
    for model in ("a", "b"):
        events.labels(model).inc(3)
        level.labels(model).set(7)
    per_job.labels("ftjob-000000000001").set(1)
    export = RayMetricsExport(registry)
    export.export_once()
    keep = {("ray_lmstack_mirror_test_events_total", (("model", "b"),)): 3.0,
            ("ray_lmstack_mirror_test_level", (("model", "b"),)): 7.0}
    gone = {("ray_lmstack_mirror_test_events_total", (("model", "a"),)): 3.0,
            ("ray_lmstack_mirror_test_level", (("model", "a"),)): 7.0,
            ("ray_lmstack_mirror_test_job_level", (("job_id", "ftjob-000000000001"),)): 1.0}
    wait_until(lambda: metrics_export_samples("ray_lmstack_mirror_test") == keep | gone, 60,
               "the mirrored series in Ray's export", interval=1.0)

    events.remove("a")
    level.remove("a")
    per_job.remove("ftjob-000000000001")
    export.export_once()
    wait_until(lambda: metrics_export_samples("ray_lmstack_mirror_test") == keep, 60,
               "the removed series to leave Ray's export", interval=1.0)
