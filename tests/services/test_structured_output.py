"""Structured output over real gRPC: constrained Complete / CompleteStream against a served model,
and every bad constraint INVALID_ARGUMENT with a message naming the problem, before anything is
queued, the server serving on."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest

from services.client import Client
from services.config import InferenceSettings
from services.inference.__main__ import setup
from tests.helpers.servers import ServerThread

SCHEMA = {"type": "object",
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 500},
                         "kind": {"enum": ["a", "b"]},
                         "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
          "required": ["id", "kind", "items"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_models):
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}"], max_batch_size=8, port=0)
    s = ServerThread(settings, "inference", setup).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def engine_of(server):
    return server.server.state.registry.lookup("tiny").obj.engine


def test_constrained_completions_unary_and_streamed(client):
    for seed in range(3):
        kw = dict(max_tokens=80, temperature=1.0, seed=seed, json_schema=SCHEMA)
        r = client.complete("record: ", **kw)
        assert r.finish_reason == "stop", r
        jsonschema.validate(json.loads(r.text), SCHEMA)
        chunks = list(client.complete_stream("record: ", **kw))
        assert "".join(c.text for c in chunks) == r.text and chunks[-1].finish_reason == "stop"
    r = client.complete("n=", max_tokens=20, temperature=1.0, seed=1, regex=r"[0-9]{2,4}(\.[0-9])?")
    assert re.fullmatch(r"[0-9]{2,4}(\.[0-9])?", r.text) and r.finish_reason == "stop"
    r = client.complete("label:", max_tokens=20, temperature=1.0, seed=2, choice=["spam", "ham"])
    assert r.text in ("spam", "ham")
    r = client.complete("{", max_tokens=40, temperature=0, grammar='root ::= "[" [0-9]+ ("," [0-9]+)* "]"')
    assert re.fullmatch(r"\[[0-9]+(,[0-9]+)*\]", r.text) or r.finish_reason == "length"
    r = client.complete("x", max_tokens=3, temperature=0, json_schema=SCHEMA)  # ends mid-structure
    assert r.finish_reason == "length" and r.usage.completion_tokens == 3 and r.text.startswith("{")


BAD = [
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema='{"type": "strnig"}'), "invalid json schema: Unsupported type \"strnig\""),
    (dict(json_schema='{"type": "integer", "minimum": 9, "maximum": 1}'), "minimum greater than maximum"),
    (dict(regex="(a"), "invalid regex: Regex parsing error at position 3"),
    (dict(grammar="root ::= "), "invalid grammar: EBNF parser error"),
    (dict(choice=["x", ""]), "choices must be non-empty"),
    (dict(regex="a", json_object=True), "at most one constraint"),
    (dict(regex="a" * 70000), "at most 65536"),
]


@pytest.mark.parametrize("kw,needle", BAD, ids=[n for _, n in BAD])
def test_bad_constraints_are_invalid_argument_before_anything_is_queued(client, server, kw, needle):
    for call in (lambda: client.complete("hello", **kw), lambda: list(client.complete_stream("hello", **kw))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert needle in e.value.details()
    assert engine_of(server).stats()["requests_finished"] >= 0 and engine_of(server).load() == (0, 0)
    assert client.complete("hello", max_tokens=2, temperature=0).usage.completion_tokens >= 1


def test_few_shot_with_a_choice_constraint(client):
    """FewShot's answer constrained to labels: the style's stop strings stay on top of the constraint."""
    examples = [("great film", "positive"), ("awful plot", "negative"), ("loved it", "positive")]
    for seed in range(3):
        r = client.few_shot("boring and long", examples, instruction="Sentiment.", temperature=1.0, seed=seed,
                            max_tokens=8, choice=["positive", "negative"])
        assert r.text in ("positive", "negative") and r.finish_reason == "stop", r
    with pytest.raises(grpc.RpcError) as e:
        client.few_shot("x", examples, regex="(")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid regex" in e.value.details()
