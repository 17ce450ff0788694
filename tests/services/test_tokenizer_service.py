"""The tokenizer service over real channels: every RPC matches lmcore exactly; errors, health,
reflection, auth, and the real ``python -m services.tokenizer`` process with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.client import Client
from services.config import TokenizerSettings
from services.tokenizer.__main__ import setup
from tests.helpers import GPT2_TIKTOKEN, ROOT, free_port, gpt2_tokenizer
from tests.helpers.servers import ServerThread

TEXTS = [
    "Hello, world! It's a test: we'll see what's what.",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # JSON-ish\n",
    "日本語のテキスト, العربية, emoji 👩‍👩‍👧 and café",
    "   lots   of    spaces\n\n\n and 12345 digits",
    "",
    "<|endoftext|> is special only when allowed",
]


@pytest.fixture(scope="module")
def server(tiny_models):
    settings = TokenizerSettings(models=[f"gpt2={GPT2_TIKTOKEN}", f"tiny={tiny_models['tiny']}"], port=0)
    s = ServerThread(settings, "tokenizer", setup).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def test_encode_decode_count_match_lmcore(client, tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert client.encode(text) == ids
        assert client.encode(text, model="tiny") == ids  # the model dir's saved tokenizer: same ids
        assert client.count_tokens(text) == len(ids)
        assert client.decode(ids) == tok.decode(ids) == text
    special = TEXTS[-1]
    assert client.encode(special, allow_special=True) == tok.encode(special, allowed_special="all")
    assert client.encode(special, allow_special=True)[0] == tok.eos_id
    assert tok.eos_id not in client.encode(special)
    assert client.count_tokens(special, allow_special=True) == len(tok.encode(special, allowed_special="all"))


def test_encode_batch_matches_lmcore(client, tok):
    texts = TEXTS * 20
    assert client.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert client.encode_batch([]) == []


def test_large_inputs_match_lmcore(client, tok):
    big = (TEXTS[0] + TEXTS[2] + "\n") * 3000  # past OFFLOAD_CHARS: encoded in a worker thread
    ids = tok.encode(big)
    assert client.encode(big) == ids
    assert client.count_tokens(big) == len(ids)
    assert client.decode(ids) == big
    assert client.encode_batch([big, "x"]) == [ids, tok.encode("x")]


def test_decode_invalid_utf8_gives_replacement_chars(client, tok):
    ids = tok.encode("é")  # one token whose bytes are a 2-byte character; take a lone byte token
    lone = [i for i in range(256) if tok.token_bytes(i) == b"\xc3"]
    assert client.decode(lone) == tok.decode(lone) == "\ufffd"
    assert client.decode(ids) == "é"


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_errors_are_clear_and_server_keeps_serving(client, tok):
    with pytest.raises(grpc.RpcError) as e:
        client.decode([1, 2, 10**6])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1000000" in e.value.details()
    assert _code(lambda: client.decode([-5])) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        client.encode("hi", model="nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "gpt2" in e.value.details()
    assert client.encode("still serving") == tok.encode("still serving")


def test_health_and_reflection(client, server):
    assert client.health_status() == "SERVING"
    assert client.health_status("lmstack.v1.TokenizerService") == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    names = {s.name for s in resp.list_services_response.service}
    assert {"lmstack.v1.TokenizerService", "grpc.health.v1.Health"} <= names


def test_auth(tiny_models):
    settings = TokenizerSettings(models=[str(GPT2_TIKTOKEN)], api_keys=["k1", "k2"], port=0)
    s = ServerThread(settings, "tokenizer", setup).start()
    try:
        with Client(s.target) as anon, Client(s.target, api_key="wrong") as bad, \
                Client(s.target, api_key="k2") as good:
            with pytest.raises(grpc.RpcError) as e:
                anon.encode("x")
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()
            assert _code(lambda: bad.encode("x")) == grpc.StatusCode.UNAUTHENTICATED
            assert good.encode("hello", model="gpt2") == gpt2_tokenizer().encode("hello")
            assert anon.health_status() == "SERVING"  # health stays open for probes
    finally:
        s.stop()


def test_module_entrypoint_env_settings_and_sigterm(tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "LMSTACK_MODELS": f"gpt2={GPT2_TIKTOKEN}", "LMSTACK_METRICS_PORT": str(metrics_port),
           "LMSTACK_HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.tokenizer", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_ready(timeout=60)
            assert c.encode("hello world") == gpt2_tokenizer().encode("hello world")
            import urllib.request

            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            assert 'lmstack_tokenizer_rpc_requests_total{code="OK",method="/lmstack.v1.TokenizerService/Encode"}' \
                in body
            n = len(gpt2_tokenizer().encode("hello world"))
            assert f'lmstack_tokenizer_tokens_total{{method="encode",model="gpt2"}} {float(n)}' in body
            assert f'lmstack_tokenizer_text_bytes_total{{method="encode",model="gpt2"}} {float(len(b"hello world"))}' in body
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_config_fails_fast(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "services.tokenizer", "--port", str(free_port()),
                           "--models", f"x={tmp_path / 'missing'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "cannot start" in proc.stderr and "missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_taken_port_fails_fast_with_one_line(flag):
    """grpcio would share the port (SO_REUSEPORT) and split the traffic; lmstack refuses it instead."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        ports = {"--port": str(free_port()), flag: str(busy)}
        proc = subprocess.run([sys.executable, "-m", "services.tokenizer", "--models", f"gpt2={GPT2_TIKTOKEN}",
                               "--log-level", "WARNING", *[x for kv in ports.items() for x in kv]],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    what = "gRPC" if flag == "--port" else "metrics"
    assert f"lmstack tokenizer: cannot start: {what} port 127.0.0.1:{busy} is already in use" in lines[0]
    if os.path.isfile("/proc/net/tcp"):
        assert f"by pid {os.getpid()} (" in lines[0]  # the test process holds it
