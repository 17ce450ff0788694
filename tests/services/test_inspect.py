"""The Inspect RPC over real channels: transformers parity end to end, every kind of served model,
the stated errors, and an inspection that never holds up the streams decoding beside it.

A real inference server serves a tiny GPT-2-vocabulary checkpoint, a LoRA adapter in its bank and a
fine-tuned full model from the store, with a small message limit (200 kB) so the size error is
cheap to reach.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import transformers

from services.client import Client
from services.config import InferenceSettings
from services.inference.__main__ import setup
from services.inference.inspection import unpack_attention
from tests.helpers import ROOT, gpt2_tokenizer
from tests.helpers.models import save_tiny_model
from tests.helpers.servers import ServerThread
from tests.services.test_adapters import publish_adapter

ADAPTER, FULL = "ft:tiny:look:aaa111", "ft:tiny:full:bbb222"
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓"
LIMIT = 200_000


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_models):
    store = tmp_path_factory.mktemp("inspect-store")
    publish_adapter(store, ADAPTER, tiny_models["tiny"], "tiny", seed=3, rank=4,
                    targets=("attn.c_attn", "mlp.c_fc"))
    tmp = store / ".incoming-full"
    save_tiny_model(tmp, 11, gpt2_tokenizer())
    os.rename(tmp, store / FULL)
    return store


@pytest.fixture(scope="module")
def server(tiny_models, store):
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(store), port=0,
                                 max_message_bytes=LIMIT)
    s = ServerThread(settings, "inference", setup).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def served(server, name: str):
    return server.server.state.registry.lookup(name).obj


def test_inspect_matches_transformers_end_to_end(client, tiny_models):
    """The service's tokens, top-k, surprise, attention (float16 on the wire) and lens against
    transformers' GPT-2 on the same checkpoint directory."""
    tok = gpt2_tokenizer()
    ids = tok.encode(TEXT)
    resp = client.inspect(TEXT, model="tiny", top_k=7, attention=True, logit_lens=True)
    assert resp.model == "tiny" and (resp.n_layer, resp.n_head) == (2, 4)
    assert [t.id for t in resp.tokens] == ids
    raw = TEXT.encode()
    assert all(raw[t.start:t.end] == t.piece for t in resp.tokens) and resp.tokens[-1].end == len(raw)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_models["tiny"], attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    probs = ref.logits[0].softmax(-1)
    T = len(ids)
    assert len(resp.positions) == T
    for t, pos in enumerate(resp.positions):
        got = torch.tensor([a.prob for a in pos.top])
        assert torch.allclose(got, probs[t].topk(7).values, atol=1e-5)
        assert torch.allclose(probs[t][[a.token_id for a in pos.top]], got, atol=1e-5)
        assert pos.has_next == (t < T - 1)
        if pos.has_next:
            p = float(probs[t, ids[t + 1]])
            assert abs(pos.next_prob - p) < 1e-5
            assert pos.next_rank == int((probs[t] > p).sum()) + 1
            assert abs(pos.surprise_bits - (-np.log2(p))) < 1e-3
    assert [a.layer for a in resp.attention] == [0, 1]
    for layer in resp.attention:
        assert list(layer.heads) == [0, 1, 2, 3] and list(layer.shape) == [4, T, T]
        att = unpack_attention(layer)
        assert np.abs(att - ref.attentions[layer.layer][0].numpy()).max() < 1e-3  # float16: 3 digits
        assert np.allclose(att.sum(-1), 1.0, atol=5e-3) and (np.triu(att, 1) == 0).all()
    hs = ref.hidden_states
    with torch.no_grad():
        lens = [hf.lm_head(hf.transformer.ln_f(h)) for h in hs[:-1]] + [hf.lm_head(hs[-1])]
    assert [row.layer for row in resp.logit_lens] == [0, 1, 2]
    for row, logits in zip(resp.logit_lens, lens):
        best = logits[0].softmax(-1).max(-1)
        assert np.allclose(row.probs, best.values.numpy(), atol=1e-5)
        assert list(row.tokens) == [tok.token_bytes(i).decode("utf-8", "backslashreplace") for i in row.token_ids]


def test_every_served_model_kind_and_an_adapter_attends_differently(client, server, store, tiny_models):
    from lmcore import load_model
    from lmcore.lora import load_adapter_model
    from lmcore.model.inspection import inspect_tokens

    base = load_model(tiny_models["tiny"])
    ids = base.tokenizer.encode(TEXT)
    assert served(server, ADAPTER).engine is served(server, "tiny").engine  # in the base's bank
    expected = {"tiny": base, ADAPTER: load_adapter_model(base, store / ADAPTER), FULL: load_model(store / FULL)}
    got = {}
    for name, model in expected.items():
        resp = client.inspect(ids, model=name, top_k=3, attention=True, layers=[1], heads=[2, 0])
        ref = inspect_tokens(model, ids, top_k=3, layers=[1], heads=[2, 0])
        assert resp.model == name and [a.layer for a in resp.attention] == [1]
        got[name] = unpack_attention(resp.attention[0])
        assert np.abs(got[name] - ref.attention[1].numpy()).max() < 1e-3, name
        assert np.allclose([[a.prob for a in p.top] for p in resp.positions], ref.top_probs.numpy(), atol=1e-5)
    assert np.abs(got[ADAPTER] - got["tiny"]).max() > 1e-2  # the adapter's queries and keys moved
    assert np.abs(got[FULL] - got["tiny"]).max() > 1e-2


@pytest.mark.parametrize("kw, message", [
    (dict(attention=True, layers=[2]), "layer 2 does not exist: this model has 2 layers, numbered 0..1"),
    (dict(attention=True, heads=[4]), "head 4 does not exist: this model has 4 heads, numbered 0..3"),
    (dict(attention=True, heads=[-1]), "head -1 does not exist"),
    (dict(top_k=51), "top_k must be between 1 and 50, got 51"),
    (dict(top_k=-2), "top_k must be between 1 and 50, got -2"),
    (dict(layers=[0]), "set attention=true"),
    (dict(text=""), "text is empty"),
    (dict(text=[3, 99999]), "token 99999 is outside the vocabulary"),
    (dict(text="word " * 200), "longer than the model's context of 128"),
    (dict(model="nope"), "nope"),
])
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(client, kw, message):
    kw = {"text": "hello world", **kw}
    with pytest.raises(grpc.RpcError) as e:
        client.inspect(kw.pop("text"), **kw)
    want = grpc.StatusCode.NOT_FOUND if "model" in kw else grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.code() == want, e.value.details()
    assert message in e.value.details()
    assert client.inspect("hello", top_k=2).positions[0].top[0].prob > 0


def test_a_response_past_the_message_limit_says_its_size_and_what_to_cut(client):
    text = " ".join(["word"] * 120)  # 120 tokens: 2 layers x 4 heads x 120^2 x 2 bytes = 230 kB > 200 kB
    with pytest.raises(grpc.RpcError) as e:
        client.inspect(text, attention=True)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details()
    assert "past the server's message limit of 195.3 KiB (200,000 bytes)" in details
    assert "ask for fewer layers or heads (each layer x head is 28,800 bytes at 120 tokens;" in details
    assert "of the 8 requested fit" in details
    fits = int(details.split("tokens; ")[1].split(" of")[0])
    assert 0 < fits < 8
    n = min(fits, 4)  # 4 heads a layer
    ok = client.inspect(text, attention=True, layers=[0], heads=list(range(n)))
    assert ok.ByteSize() <= LIMIT and list(ok.attention[0].shape) == [n, 120, 120]


def test_inspect_in_flight_does_not_hold_up_or_corrupt_decoding_streams(client, server, tiny_models):
    """An inspection paused in the middle of its forward pass (a hook on the final LayerNorm, which
    only plain forwards call) while 8 streams run from start to finish: they all complete, with the
    tokens they give alone, before the inspection resumes; then it answers correctly."""
    from lmcore import SamplingParams, generate, load_model

    model = served(server, "tiny").model
    entered, release, calls = threading.Event(), threading.Event(), []

    def pause(module, args, output):
        if not calls:
            calls.append(threading.current_thread().name)
            entered.set()
            release.wait(120)

    handle = model.transformer.ln_f.register_forward_hook(pause)
    prompts = [f"Stream number {i} says" for i in range(8)]
    try:
        with ThreadPoolExecutor(9) as pool:
            inspecting = pool.submit(client.inspect, TEXT, attention=True, logit_lens=True)
            assert entered.wait(60), "the inspection never started its forward pass"
            streams = [pool.submit(lambda p: [t for c in client.complete_stream(p, max_tokens=40, temperature=0,
                                                                                   ignore_eos=True)
                                              for t in c.token_ids], p) for p in prompts]
            outputs = [s.result(120) for s in streams]  # all finish while the inspection is paused
            assert not inspecting.done()
            release.set()
            resp = inspecting.result(60)
    finally:
        release.set()
        handle.remove()
    assert calls[0].startswith("lmstack-inspect")  # it ran on the inspect worker, not the step thread
    ref_model = load_model(tiny_models["tiny"])
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for p, out in zip(prompts, outputs):
        ref = generate(ref_model, [ref_model.tokenizer.encode(p)], params, tokenizer=ref_model.tokenizer)[0]
        assert out == list(ref.token_ids), p
    assert len(resp.attention) == 2 and len(resp.logit_lens) == 3


def test_inspect_calls_queue_to_a_bound_then_resource_exhausted(tiny_models, store):
    """One inspection runs (paused mid-forward) and ``inspect_max_waiting`` = 1 waits: of two more
    calls sent together, one waits and the other is refused with RESOURCE_EXHAUSTED at once (before
    the pause ends); after it, the waiting ones answer and the server serves again."""
    from concurrent.futures import FIRST_COMPLETED, wait

    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(store), port=0,
                                 inspect_max_waiting=1)
    srv = ServerThread(settings, "inference", setup).start()
    model = served(srv, "tiny").model
    entered, release = threading.Event(), threading.Event()

    def pause(module, args, output):
        if not entered.is_set():
            entered.set()
            release.wait(120)

    handle = model.transformer.ln_f.register_forward_hook(pause)
    try:
        with Client(srv.target, timeout=120) as c, ThreadPoolExecutor(3) as pool:
            running = pool.submit(c.inspect, TEXT)
            assert entered.wait(60), "the first inspection never started its forward pass"
            calls = [pool.submit(c.inspect, TEXT) for _ in range(2)]
            done, pending = wait(calls, timeout=60, return_when=FIRST_COMPLETED)
            assert len(done) == 1 and len(pending) == 1 and not running.done()
            error = done.pop().exception()
            assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "inspect" in error.details()
            release.set()
            assert len(running.result(60).tokens) == len(pending.pop().result(60).tokens) > 0
            assert len(c.inspect(TEXT).tokens) > 0  # the queue drained: served again
    finally:
        release.set()
        handle.remove()
        srv.stop()


# --- lmstack inspect ---------------------------------------------------------------------------------
def lmstack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def assert_picture(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG that decodes, of ``size`` when given, and not blank (many colors, real contrast)."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 20, "the picture is (nearly) one color"
    colors = pixels.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])  # one int per color
    assert len(np.unique(colors)) > 50
    return pixels


def test_cli_prints_tokens_alternatives_surprise_and_the_lens(server):
    r = lmstack("inspect", "The quick brown fox", "--addr", server.target, "--top-k", "3", "--logit-lens")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "tiny: 4 tokens, 2 layers x 4 heads"
    assert lines[2].split()[:2] == ["0", "The"] and lines[2].split()[2] == "␣quick"
    assert lines[5].split()[:3] == ["3", "␣fox", "-"]
    assert "mean surprise" in r.stdout and "logit lens" in r.stdout
    assert [ln.split()[0] for ln in lines if ln.startswith(" pos")] == ["pos", "pos"]
    assert "emb" in r.stdout and "L2" in r.stdout


def test_cli_png_grid_and_single_head(server, tmp_path):
    grid = tmp_path / "grid.png"
    r = lmstack("inspect", TEXT, "--addr", server.target, "--png", str(grid), "--logit-lens", "--size", "900x1100")
    assert r.returncode == 0, r.stderr
    assert f"wrote {grid} (900x1100 px)" in r.stderr
    assert_picture(grid, (900, 1100))
    one = tmp_path / "one.png"
    r = lmstack("inspect", "The quick brown fox", "--addr", server.target, "--png", str(one), "--layer", "1",
                "--head", "2")
    assert r.returncode == 0, r.stderr
    pixels = assert_picture(one)
    assert pixels.shape[1] == 900  # one head large: 9 inches at 100 dpi
    r = lmstack("inspect", "hello", "--addr", server.target, "--png", str(tmp_path / "x.png"), "--layer", "7")
    assert r.returncode == 1 and "INVALID_ARGUMENT: layer 7 does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()
