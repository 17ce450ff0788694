"""Tenants end to end: keys that name a tenant, isolation in both directions, quotas, model
lifecycle (LRU unload, DeleteModel), TLS/mTLS and the refusal to be exposed unsafely.

Real servers on 127.0.0.1 (``ServerThread``: the services' own ``setup``), a real redis-server, a
real keys file written by ``lmstack keys create``, real certificates made by ``cryptography``.
Two members (``team-a``, ``team-b``) and an admin (``ops``); ``team-q`` has small quotas.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import grpc
import pytest

from services.cli import main as cli_main
from services.client import Client
from services.config import InferenceSettings, TokenizerSettings
from services.finetune.__main__ import setup as finetune_setup
from services.finetune.client import FineTuneClient, status_name
from services.finetune.settings import FineTuneSettings
from services.tenants import hash_key, load_keys_file
from tests.helpers import GPT2_TIKTOKEN, ROOT, free_port, gpt2_tokenizer
from tests.helpers.models import save_tiny_model
from tests.helpers.servers import ServerThread

QUOTAS = {"team-q": ["concurrent_requests=1", "tokens_per_minute=60", "active_jobs=2", "dataset_bytes=1200",
                     "published_models=3"]}


def create_key(keys_file: Path, tenant: str, role: str = "member", quotas=(), capsys=None) -> str:
    argv = ["keys", "create", "--tenant", tenant, "--role", role, "--file", str(keys_file)]
    for q in quotas:
        argv += ["--quota", q]
    assert cli_main(argv) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A keys file with four tenants, made by the real CLI (its stdout is the key, shown once)."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("keys") / "api-keys.yaml"
    out = {}
    for tenant, role in (("team-a", "member"), ("team-b", "member"), ("ops", "admin"), ("team-q", "member")):
        argv = ["keys", "create", "--tenant", tenant, "--role", role, "--file", str(path)]
        for q in QUOTAS.get(tenant, []):
            argv += ["--quota", q]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert cli_main(argv) == 0
        out[tenant] = buf.getvalue().strip()
    return path, out


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


# --- the keys file ---------------------------------------------------------------------------------
def test_keys_file_holds_only_hashes_and_create_prints_a_working_key_once(keys, tmp_path, capsys):
    path, plain = keys
    text = path.read_text()
    for key in plain.values():
        assert key.startswith("lmsk-") and len(key) > 40
        assert key not in text and hash_key(key) in text  # the hash is stored, never the key
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    tenants = {t.name: t for t in load_keys_file(path).values()}
    assert tenants["ops"].is_admin and not tenants["team-a"].is_admin
    assert tenants["team-q"].quotas.concurrent_requests == 1 and tenants["team-q"].quotas.dataset_bytes == 1200

    # a second key for a tenant keeps its role and quotas; a conflicting role is refused
    again = create_key(path, "team-q", role="member", quotas=QUOTAS["team-q"], capsys=capsys)
    assert again != plain["team-q"] and len(load_keys_file(path)) == 5
    assert cli_main(["keys", "create", "--tenant", "team-q", "--role", "admin", "--file", str(path)]) == 1
    assert "already has keys with role member" in capsys.readouterr().err
    assert cli_main(["keys", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "team-q" in listing and "2 key(s)" in listing and plain["team-q"] not in listing

    # a plaintext key in the file, or garbage, is a clear start-up error
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"keys": {"my-secret-key": {"tenant": "x"}}}))
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        load_keys_file(bad)
    bad.write_text(json.dumps({"keys": {hash_key("k"): {"tenant": "x", "role": "root"}}}))
    with pytest.raises(ValueError, match="role 'root'"):
        load_keys_file(bad)


# --- fine-tuning isolation and quotas ---------------------------------------------------------------
def records(n: int, tag: str = "") -> bytes:
    return ("\n".join(json.dumps({"prompt": f"Q{tag}: {i} plus {i}?\nA:", "completion": f" {2 * i}"})
                      for i in range(n)) + "\n").encode()


@pytest.fixture
def finetune(tmp_path, redis_server, tiny_models, keys):
    store = tmp_path / "store"
    store.mkdir()
    settings = FineTuneSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(store),
                                redis_url=redis_server.url, api_keys_file=str(keys[0]), port=0)
    s = ServerThread(settings, "finetune", finetune_setup).start()
    clients = {t: FineTuneClient(s.target, api_key=k, timeout=30) for t, k in keys[1].items()}
    clients["ops-for-b"] = FineTuneClient(s.target, api_key=keys[1]["ops"], tenant="team-b", timeout=30)
    s.store = store
    s.clients = clients
    yield s
    for c in clients.values():
        c.close()
    s.stop()


def assert_hidden(me, my_ds, my_job, other_ds, other_job) -> None:
    """``me`` sees its own dataset and job, and every RPC on the other tenant's is NOT_FOUND."""
    assert me.get_dataset(my_ds.id).id == my_ds.id
    assert [j.id for j in me.list_jobs().jobs] == [my_job.id]  # lists: own only
    for call, what in ((lambda: me.get_dataset(other_ds.id), "dataset"),
                       (lambda: me.create_job("tiny", other_ds.id, max_steps=2), "dataset"),  # train on other's
                       (lambda: me.get_job(other_job.id), "job"),
                       (lambda: me.cancel_job(other_job.id), "job"),
                       (lambda: me.list_checkpoints(other_job.id), "job"),
                       (lambda: list(me.watch_job(other_job.id, timeout=10)), "job")):
        code, details = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and f"{what} " in details and "not found" in details, details
    # the very message an unknown id gets: existence is not leaked
    unknown = code_of(lambda: me.get_job("ftjob-000000000000"))[1]
    assert code_of(lambda: me.get_job(other_job.id))[1] == unknown.replace("ftjob-000000000000", other_job.id)


def test_finetune_isolation_both_ways_and_admin_sees_all(finetune, keys):
    a, b, ops, ops_b = (finetune.clients[t] for t in ("team-a", "team-b", "ops", "ops-for-b"))
    ds_a, ds_b = a.upload_dataset(records(8, "a")), b.upload_dataset(records(8, "b"))
    assert (ds_a.tenant, ds_b.tenant) == ("team-a", "team-b")
    job_a = a.create_job("tiny", ds_a.id, max_steps=2, idempotency_key="nightly")
    job_b = b.create_job("tiny", ds_b.id, max_steps=2, idempotency_key="nightly")
    assert job_a.id != job_b.id and (job_a.tenant, job_b.tenant) == ("team-a", "team-b")  # keys per tenant
    assert a.create_job("tiny", ds_a.id, max_steps=2, idempotency_key="nightly").id == job_a.id  # still honoured

    assert_hidden(a, ds_a, job_a, ds_b, job_b)
    assert_hidden(b, ds_b, job_b, ds_a, job_a)
    for job, owner in ((job_a, a), (job_b, b)):  # neither cancel attempt touched the other's job
        got = owner.get_job(job.id)
        assert status_name(got.status) == "queued" and not got.cancel_requested

    # the admin sees and acts on everything; acting for team-b it is team-b
    assert {j.id for j in ops.list_jobs().jobs} == {job_a.id, job_b.id}
    assert ops.get_dataset(ds_a.id).tenant == "team-a" and ops.get_job(job_b.id).tenant == "team-b"
    assert [j.id for j in ops_b.list_jobs().jobs] == [job_b.id]
    assert code_of(lambda: ops_b.get_job(job_a.id))[0] == grpc.StatusCode.NOT_FOUND
    ds_for_b = ops_b.upload_dataset(records(4, "ops"))
    assert ds_for_b.tenant == "team-b" and b.get_dataset(ds_for_b.id).id == ds_for_b.id
    assert status_name(ops.cancel_job(job_a.id).status) == "cancelled"  # the admin cancels a's job
    events = list(a.watch_job(job_a.id, timeout=30))  # the owner watches it to its end
    assert status_name(events[-1].status) == "cancelled"

    # a member may not act for anyone; an admin may not act for a tenant that does not exist
    member_acting = FineTuneClient(finetune.target, api_key=keys[1]["team-a"], tenant="team-b")
    ghost = FineTuneClient(finetune.target, api_key=keys[1]["ops"], tenant="nobody")
    try:
        assert code_of(lambda: member_acting.list_jobs())[0] == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: ghost.list_jobs())[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        member_acting.close()
        ghost.close()


def test_finetune_quotas_are_atomic_named_and_recover(finetune):
    q, a = finetune.clients["team-q"], finetune.clients["team-a"]
    ds = q.upload_dataset(records(10))
    assert ds.bytes == 515  # two such datasets fit in 1200 bytes, three do not
    # dataset_bytes (1200): the second fits, the third does not; other tenants are not affected
    q.upload_dataset(records(10, "x"))
    code, details = code_of(lambda: q.upload_dataset(records(10, "y")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota dataset_bytes of tenant 'team-q'" in details and "limit 1200" in details and "1040 bytes stored" in details
    a.upload_dataset(records(10, "y"))
    # a file over the quota on its own is refused while streaming
    code, details = code_of(lambda: q.upload_dataset(records(200), chunk_bytes=256))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "dataset_bytes" in details

    # active_jobs (2): four concurrent creates, exactly two queued
    results: list = []

    def create(i):
        try:
            results.append(q.create_job("tiny", ds.id, max_steps=2, suffix=f"c{i}").id)
        except grpc.RpcError as e:
            results.append(e)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if not isinstance(r, str)]
    assert len(made) == 2 and len(refused) == 2
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota active_jobs of tenant 'team-q' reached (limit 2)" in e.details()
    q.cancel_job(made[0])  # after the burst: a slot frees, creating succeeds again
    third = q.create_job("tiny", ds.id, max_steps=2)
    q.cancel_job(third.id)
    q.cancel_job(made[1])

    # published_models (3): models already in the store count, with jobs that will publish one
    for i in range(3):
        d = save_tiny_model(finetune.store / f"ft:tiny:q{i}:{i:06d}", i, gpt2_tokenizer())
        (d / "finetune.json").write_text(json.dumps({"tenant": "team-q"}))
    code, details = code_of(lambda: q.create_job("tiny", ds.id, max_steps=2))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota published_models" in details and "limit 3" in details
    shutil.rmtree(finetune.store / "ft:tiny:q0:000000")  # (DeleteModel does this; see below)
    q.cancel_job(q.create_job("tiny", ds.id, max_steps=2).id)


# --- inference: isolation, quotas, lifecycle ---------------------------------------------------------
MODEL_A, MODEL_B = "ft:tiny:a:aaaaaa", "ft:tiny:b:bbbbbb"


def publish(store: Path, name: str, tenant: str, seed: int) -> Path:
    tmp = store / f".tmp-{name}"
    save_tiny_model(tmp, seed, gpt2_tokenizer())
    (tmp / "finetune.json").write_text(json.dumps({"tenant": tenant, "job_id": "ftjob-x"}))
    tmp.rename(store / name)
    return store / name


@pytest.fixture
def inference(tmp_path, tiny_models, keys):
    from services.inference.__main__ import setup

    store = tmp_path / "store"
    store.mkdir()
    publish(store, MODEL_A, "team-a", 11)
    publish(store, MODEL_B, "team-b", 12)
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(store),
                                 api_keys_file=str(keys[0]), max_loaded_models=1, port=0, http_port=free_port())
    s = ServerThread(settings, "inference", setup).start(timeout=300)  # a loaded CI machine is slow to load
    s.store = store
    s.http = f"http://127.0.0.1:{settings.http_port}/v1"
    s.clients = {t: Client(s.target, api_key=k, timeout=60) for t, k in keys[1].items()}
    yield s
    for c in s.clients.values():
        c.close()
    s.stop()


def test_inference_isolation_and_admin_sees_all(inference, tiny_models, keys):
    a, b, ops = (inference.clients[t] for t in ("team-a", "team-b", "ops"))
    assert [m.name for m in a.list_models()] == ["tiny", MODEL_A]
    assert [m.name for m in b.list_models()] == ["tiny", MODEL_B]
    assert {m.name: m.tenant for m in ops.list_models()} == {"tiny": "", MODEL_A: "team-a", MODEL_B: "team-b"}
    calls = {
        "Complete": lambda c, m: c.complete("Hello", model=m, max_tokens=2),
        "CompleteStream": lambda c, m: list(c.complete_stream("Hello", model=m, max_tokens=2)),
        "FewShot": lambda c, m: c.few_shot("cat", [("dog", "chien")], model=m, max_tokens=2),
        "Score": lambda c, m: c.score("The sky is", [" blue"], model=m),
        "Inspect": lambda c, m: c.inspect("The sky", model=m, top_k=2),
        "DeleteModel": lambda c, m: c.delete_model(m),
    }
    for me, mine, theirs in ((a, MODEL_A, MODEL_B), (b, MODEL_B, MODEL_A)):
        for rpc, call in calls.items():
            code, details = code_of(lambda: call(me, theirs))  # noqa: B023 (called at once)
            assert code == grpc.StatusCode.NOT_FOUND, (rpc, details)
            assert f"model {theirs!r} not found" in details and theirs not in details.split("served models:")[1]
            if rpc != "DeleteModel":
                call(me, mine)  # its own works
        call = calls["Complete"]
        assert call(me, "tiny").usage.completion_tokens == 2  # the shared base works for everyone
    for m in (MODEL_A, MODEL_B):
        assert ops.complete("Hello", model=m, max_tokens=2).usage.completion_tokens == 2
    # the tokenizer service scopes the same way
    from services.tokenizer.__main__ import setup as tok_setup

    t = ServerThread(TokenizerSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(inference.store),
                                       api_keys_file=str(keys[0]), port=0), "tokenizer", tok_setup).start()
    try:
        with Client(t.target, api_key=keys[1]["team-a"]) as ta:
            assert ta.encode("hi", model=MODEL_A) == ta.encode("hi")
            assert code_of(lambda: ta.encode("hi", model=MODEL_B))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        t.stop()


def test_http_api_applies_the_same_tenants_and_quotas(inference, keys):
    """The OpenAI-compatible API (the real ``openai`` client) on the same handler: the same keys,
    ownership and quotas as gRPC; another tenant's model is a 404, a quota a 429."""
    import openai  # the dev extra: the real client

    def client(tenant, **kw):
        return openai.OpenAI(base_url=inference.http, api_key=keys[1][tenant], max_retries=0, timeout=60, **kw)

    a, b, ops, q = client("team-a"), client("team-b"), client("ops"), client("team-q")
    assert [m.id for m in a.models.list().data] == ["tiny", MODEL_A]
    assert [m.id for m in b.models.list().data] == ["tiny", MODEL_B]
    assert {m.id: m.owned_by for m in ops.models.list().data} == {"tiny": "lmstack", MODEL_A: "team-a",
                                                                  MODEL_B: "team-b"}
    assert a.completions.create(model=MODEL_A, prompt="Hello", max_tokens=2).usage.completion_tokens == 2
    for call in (lambda: a.completions.create(model=MODEL_B, prompt="Hello", max_tokens=2),
                 lambda: a.models.retrieve(MODEL_B)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert MODEL_B not in str(e.value.body).split("served models")[-1] or "served models" not in str(e.value.body)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=inference.http, api_key="lmsk-wrong", max_retries=0).models.list()
    # The /inspect page's API (POST /v1/inspect, what the page calls with the key typed into it).
    def inspect(tenant, model):
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {keys[1][tenant]}"}
                                                          if tenant else {})
        req = urllib.request.Request(f"{inference.http}/inspect", method="POST", headers=headers,
                                     data=json.dumps({"model": model, "text": "Hello there"}).encode())
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = inspect("team-a", MODEL_A)
    assert status == 200 and len(body["tokens"]) > 1
    assert inspect("team-a", MODEL_B)[0] == 404 and inspect("team-b", MODEL_A)[0] == 404
    assert inspect(None, MODEL_A)[0] == 401 and inspect("ops", MODEL_B)[0] == 200
    acting = openai.OpenAI(base_url=inference.http, api_key=keys[1]["ops"], max_retries=0,
                           default_headers={"LMSTACK-Tenant": "team-b"})
    assert [m.id for m in acting.models.list().data] == ["tiny", MODEL_B]
    # team-q's one concurrent request is in flight over gRPC: HTTP shares the quota, 429
    with Client(inference.target, api_key=keys[1]["team-q"]) as grpc_q:
        stream = grpc_q.complete_stream("Once upon a time", max_tokens=120, ignore_eos=True)
        assert next(stream).token_ids
        with pytest.raises(openai.RateLimitError) as e:
            q.completions.create(model="tiny", prompt="Hi", max_tokens=1)
        assert "quota concurrent_requests of tenant 'team-q' reached (limit 1)" in str(e.value)
        stream.cancel()


def test_request_quotas_reached_reported_and_recovered(inference):
    q, a = inference.clients["team-q"], inference.clients["team-a"]
    # concurrent_requests (1): a second request while one streams is refused, then accepted again
    stream = q.complete_stream("Once upon a time", max_tokens=120, temperature=0, ignore_eos=True)
    first = next(stream)
    assert first.token_ids
    code, details = code_of(lambda: q.complete("Hi", max_tokens=1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota concurrent_requests of tenant 'team-q' reached (limit 1)" in details
    assert a.complete("Hi", max_tokens=1).usage.completion_tokens == 1  # others are not limited by it
    stream.cancel()
    deadline = time.monotonic() + 30
    while True:  # the cancel reaches the server asynchronously
        try:
            q.score("Hi", [" there"])
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)

    # tokens_per_minute (60): prompt + completion tokens over a sliding window
    quotas = inference.server.state.handler.quotas
    quotas.window_s = 3.0  # the same sliding window, shortened so the test sees it recover
    time.sleep(3.1)
    assert q.complete("Hello world", max_tokens=55, temperature=0, ignore_eos=True).usage.total_tokens == 57
    longer = "Hello world, again and again and again"  # 8 tokens: 55 + 8 > 60 whatever has left the window
    code, details = code_of(lambda: q.complete(longer, max_tokens=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota tokens_per_minute of tenant 'team-q' reached (limit 60)" in details and "tokens used" in details
    time.sleep(3.1)
    assert q.complete(longer, max_tokens=5).usage.completion_tokens == 5
    text = "\n".join(line for line in _metrics(inference).splitlines() if "lmstack_tenant" in line)
    assert 'lmstack_tenant_quota_rejections_total{quota="tokens_per_minute",tenant="team-q"} 1.0' in text
    assert 'lmstack_tenant_quota_rejections_total{quota="concurrent_requests",tenant="team-q"}' in text


def _metrics(server) -> str:
    from prometheus_client import generate_latest

    return generate_latest(server.server.metrics_registry).decode()


def test_lru_unload_alternates_two_tenants_models_and_frees_memory(inference):
    a, b, ops = (inference.clients[t] for t in ("team-a", "team-b", "ops"))
    registry = inference.server.state.registry
    loaded = lambda: {e.name for e in registry.entries() if e.spec.source == "store"}  # noqa: E731
    assert loaded() == set()  # store models load on first use
    want = {}
    for model, client in ((MODEL_A, a), (MODEL_B, b)):
        want[model] = list(client.complete("Once upon", model=model, max_tokens=8, temperature=0,
                                           ignore_eos=True).token_ids)
    assert loaded() == {MODEL_B}  # N=1: B's load unloaded A
    assert want[MODEL_A] != want[MODEL_B]
    ref = weakref.ref(registry.lookup(MODEL_B).obj.model)
    for _ in range(2):  # alternate: each reload gives the same tokens
        for model, client in ((MODEL_A, a), (MODEL_B, b)):
            got = client.complete("Once upon", model=model, max_tokens=8, temperature=0, ignore_eos=True)
            assert list(got.token_ids) == want[model]
            assert loaded() == {model}
    inference.call(lambda: None)
    gc.collect()
    assert ref() is None  # the unloaded model's weights were freed (no engine, thread or cache holds them)
    assert {m.name for m in ops.list_models()} == {"tiny", MODEL_A, MODEL_B}  # unloaded ones are still listed

    # DeleteModel: the owner deletes its own (unloaded and removed), configured models cannot be deleted
    assert code_of(lambda: ops.delete_model("tiny"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    done = b.delete_model(MODEL_B)
    assert done.name == MODEL_B and done.unloaded
    assert not (inference.store / MODEL_B).exists() and loaded() == set()
    assert code_of(lambda: b.complete("x", model=MODEL_B))[0] == grpc.StatusCode.NOT_FOUND
    assert [m.name for m in b.list_models()] == ["tiny"]
    assert ops.delete_model(MODEL_A).unloaded is False  # an admin deletes anyone's; it was not loaded
    assert [m.name for m in ops.list_models()] == ["tiny"]


# --- TLS and exposure --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tests.helpers.tls import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


def tokenizer_server(**kw) -> ServerThread:
    from services.tokenizer.__main__ import setup

    return ServerThread(TokenizerSettings(models=[f"gpt2={GPT2_TIKTOKEN}"], port=0, **kw), "tokenizer", setup)


def test_tls_clients_succeed_plaintext_and_untrusted_fail(pki):
    s = tokenizer_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)).start()
    try:
        with Client(s.target, tls_ca=str(pki.ca), timeout=10) as c:
            assert c.count_tokens("hello world") == 2
        with Client(f"localhost:{s.settings.port}", tls_ca=str(pki.ca), timeout=10) as c:
            assert c.count_tokens("hello world") == 2
        with Client(s.target, timeout=5) as plain:
            assert code_of(lambda: plain.count_tokens("hello"))[0] == grpc.StatusCode.UNAVAILABLE
        with Client(s.target, tls_ca=str(pki.other_ca), timeout=5) as untrusted:
            assert code_of(lambda: untrusted.count_tokens("hello"))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_mtls_requires_a_client_certificate(pki, keys):
    s = tokenizer_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca),
                         api_keys_file=str(keys[0])).start()
    key = keys[1]["team-a"]
    try:
        with Client(s.target, api_key=key, tls_ca=str(pki.ca), timeout=5) as no_cert:
            assert code_of(lambda: no_cert.count_tokens("hello"))[0] == grpc.StatusCode.UNAVAILABLE
        with Client(s.target, api_key=key, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                    tls_key=str(pki.client_key), timeout=10) as c:
            assert c.count_tokens("hello world") == 2
        with Client(s.target, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key),
                    timeout=10) as no_key:  # a certificate is not an API key
            assert code_of(lambda: no_key.count_tokens("hello"))[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        s.stop()


def test_https_for_the_http_api(pki, keys, tiny_models):
    import ssl
    import urllib.error
    import urllib.request

    from services.inference.__main__ import setup

    port = free_port()
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}"], port=0, http_port=port,
                                 tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), api_keys_file=str(keys[0]))
    s = ServerThread(settings, "inference", setup).start()

    def get(scheme: str, cafile=None):
        req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/v1/models",
                                     headers={"Authorization": f"Bearer {keys[1]['team-a']}"})
        context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return json.loads(r.read())

    try:
        assert [m["id"] for m in get("https", pki.ca)["data"]] == ["tiny"]
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            get("http")  # plaintext HTTP to the TLS port: no answer
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get("https", pki.other_ca)
        with Client(s.target, api_key=keys[1]["team-a"], tls_ca=str(pki.ca)) as c:  # gRPC on the same TLS files
            assert [m.name for m in c.list_models()] == ["tiny"]
    finally:
        s.stop()


def test_refuses_to_serve_beyond_loopback_without_keys_and_tls(pki, keys, tmp_path, capsys):
    import asyncio

    from services.server import GrpcServer

    def start(**kw):
        settings = TokenizerSettings(models=[f"gpt2={GPT2_TIKTOKEN}"], host="0.0.0.0", port=free_port(), **kw)
        async def go():  # grpc.aio servers are built inside a running loop
            return await GrpcServer(settings, "tokenizer").start()

        return asyncio.run(go())

    for kw, missing in (({}, "API keys (--api-keys-file or --api-keys) and TLS"),
                        ({"api_keys_file": str(keys[0])}, "without TLS"),
                        ({"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}, "without API keys")):
        with pytest.raises(ValueError, match="refusing to serve the tokenizer service on 0.0.0.0") as e:
            start(**kw)
        assert missing in str(e.value) and "--insecure" in str(e.value)

    # the real process says why and exits 2; lmstack serve refuses before starting anything
    proc = subprocess.run([sys.executable, "-m", "services.tokenizer", "--host", "0.0.0.0", "--port",
                           str(free_port()), "--models", f"gpt2={GPT2_TIKTOKEN}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "refusing to serve" in proc.stderr
    with pytest.raises(SystemExit, match="refusing to serve the platform on 0.0.0.0"):
        cli_main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data"), "--no-finetune"])

    # keys + TLS, or an explicit --insecure, are accepted on 0.0.0.0
    s = tokenizer_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), api_keys_file=str(keys[0]))
    s.settings = s.settings.model_copy(update={"host": "0.0.0.0"})
    s.start()
    try:
        with Client(f"127.0.0.1:{s.settings.port}", api_key=keys[1]["team-b"], tls_ca=str(pki.ca)) as c:
            assert c.count_tokens("hello world") == 2
    finally:
        s.stop()


# --- lmstack serve's private Redis and docker-compose.yml ------------------------------------------
def test_serve_gives_its_redis_a_generated_password(tmp_path):
    import argparse

    import redis

    from services.cli import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    model = tmp_path / "m"
    model.mkdir()
    args = p.parse_args(["--data-dir", str(tmp_path / "data"), "--model", str(model), "--redis-port",
                         str(free_port())])
    children, url = serve.plan(args)
    pw_file = tmp_path / "data" / "redis.password"
    password = pw_file.read_text().strip()
    assert len(password) >= 32 and oct(pw_file.stat().st_mode & 0o777) == "0o600"
    redis_child = next(c for c in children if c.name == "redis")
    assert password not in " ".join(redis_child.argv) and password not in url  # not in ps, not in a URL
    api = next(c for c in children if c.name == "finetune")
    assert api.env["LMSTACK_REDIS_PASSWORD_FILE"] == str(pw_file) and password not in json.dumps(api.env)
    proc = subprocess.Popen(redis_child.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        anon = redis.Redis.from_url(url)
        while True:
            try:
                anon.ping()
                pytest.fail("the private Redis answered without a password")
            except redis.AuthenticationError:
                break  # NOAUTH: it is up and wants the password
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        assert redis.Redis.from_url(url, password=password).ping()
        assert serve.plan(args)[1] == url and pw_file.read_text().strip() == password  # generated once
    finally:
        proc.terminate()
        proc.wait(10)


def test_compose_uses_keys_tls_and_a_redis_password():
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("tokenizer", "inference", "finetune", "worker"):
        env, volumes = services[name]["environment"], services[name]["volumes"]
        assert env["LMSTACK_API_KEYS_FILE"].startswith("/etc/lmstack/") and env["LMSTACK_TLS_CERT"] and \
            env["LMSTACK_TLS_KEY"], name
        assert env["LMSTACK_REDIS_PASSWORD_FILE"] == "/etc/lmstack/redis.password"
        assert "./secrets:/etc/lmstack:ro" in volumes and "LMSTACK_INSECURE" not in env
    redis_svc = services["redis"]
    assert "/etc/lmstack/redis.conf" in redis_svc["command"] and "ports" not in redis_svc
