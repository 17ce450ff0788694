"""deploy/ray_serve.py: the same handlers behind Ray Serve's gRPC proxy, on a local Ray instance."""

from __future__ import annotations

import grpc
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from tests.helpers import free_port, gpt2_tokenizer  # noqa: E402
from tests.helpers.models import save_tiny_model  # noqa: E402


def ray_client(addr: str):
    """A services.client.Client whose calls name the Ray Serve application (Ray's routing metadata)."""
    from services.client import Client

    c = Client(addr)
    c.metadata = (("application", "lmstack"),)
    return c


def wait_for_proxy_route(addr: str, timeout: float = 60.0) -> None:
    """The proxy learns about a new application a moment after serve.run returns."""
    import time

    deadline = time.monotonic() + timeout
    with ray_client(addr) as c:
        while True:
            try:
                c.list_models(timeout=60)
                return
            except grpc.RpcError as e:
                if time.monotonic() > deadline or "Application" not in (e.details() or ""):
                    raise
                time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    from deploy.ray_serve import build_app, start_grpc

    tok = gpt2_tokenizer()
    model_dir = save_tiny_model(tmp_path_factory.mktemp("ray") / "tiny", 0, tok)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        start_grpc(port, http_port=free_port())
        serve.run(build_app({"models": f"tiny={model_dir}"}), name="lmstack", route_prefix="/lmstack")
        wait_for_proxy_route(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", model_dir, tok
    finally:
        serve.shutdown()
        ray.shutdown()


def test_complete_through_ray_matches_lmcore(ray_app):
    from lmcore import SamplingParams, generate, load_model
    addr, model_dir, tok = ray_app
    prompt = "The quick brown fox"
    expected = generate(load_model(model_dir), [tok.encode(prompt)], SamplingParams(max_tokens=12, temperature=0))
    with ray_client(addr) as c:
        r = c.complete(prompt, max_tokens=12, temperature=0)
        assert list(r.token_ids) == expected[0].token_ids
        streamed = "".join(ch.text for ch in c.complete_stream(prompt, max_tokens=12, temperature=0))
        assert streamed == r.text
        assert c.encode(prompt) == tok.encode(prompt)
        assert [m.name for m in c.list_models()] == ["tiny"]


def test_errors_keep_their_status_codes_through_ray(ray_app):
    addr, _, _ = ray_app
    with ray_client(addr) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.complete("hi", temperature=-1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            c.complete("hi", model="nope")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert c.complete("hi", max_tokens=2).usage.completion_tokens == 2  # still serving


def test_inspect_through_ray_matches_lmcore(ray_app):
    from lmcore import inspect_tokens, load_model
    from services.inference.inspection import unpack_attention

    addr, model_dir, tok = ray_app
    text = "The quick brown fox"
    ref = inspect_tokens(load_model(model_dir), tok.encode(text), top_k=3, layers=[1])
    with ray_client(addr) as c:
        r = c.inspect(text, top_k=3, attention=True, layers=[1])
        assert [t.id for t in r.tokens] == tok.encode(text)
        assert abs(unpack_attention(r.attention[0]) - ref.attention[1].numpy()).max() < 1e-3
        with pytest.raises(grpc.RpcError) as e:
            c.inspect(text, attention=True, layers=[5])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layer 5 does not exist" in e.value.details()
