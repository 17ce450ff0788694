"""The tokenizer service's bounds: counts and sizes refused before the work, answers that could not
fit the message limit refused up front, and the service keeps serving."""

from __future__ import annotations

import grpc
import pytest

from services.client import Client
from services.config import TokenizerSettings
from services.tokenizer.__main__ import setup
from tests.helpers import GPT2_TIKTOKEN
from tests.helpers.servers import ServerThread

MESSAGE = 1 << 20  # a 1 MiB message limit keeps the requests of this test small


@pytest.fixture(scope="module")
def client():
    settings = TokenizerSettings(models=[f"gpt2={GPT2_TIKTOKEN}"], port=0, max_message_bytes=MESSAGE,
                                 max_batch_texts=100, max_decode_ids=10_000, max_text_bytes=512 * 1024)
    server = ServerThread(settings, "tokenizer", setup).start()
    with Client(server.target, max_message_bytes=4 * MESSAGE) as c:
        yield c
    server.stop()


def _refused(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    return e.value.details()


def test_counts_and_sizes_are_bounded(client):
    assert "101" in _refused(lambda: client.encode_batch([""] * 101))
    assert "10001" in _refused(lambda: client.decode([1] * 10_001))
    assert "max_text_bytes" in _refused(lambda: client.encode("a" * (600 * 1024)))
    assert "max_text_bytes" in _refused(lambda: client.count_tokens("a" * (600 * 1024)))
    assert client.encode_batch(["a"] * 100) == [[64]] * 100


def test_an_answer_that_could_not_fit_the_message_limit_is_refused_before_the_work(client):
    emoji = "👩‍👩‍👧" * 20_000  # 500 KB of text, up to one id per byte: past a 1 MiB answer
    assert "message limit" in _refused(lambda: client.encode(emoji))
    assert client.count_tokens(emoji) > 0  # counting answers one number: allowed
    assert client.decode(client.encode("fine")) == "fine"
