"""The proto is the contract: stubs are fresh, the names clients rely on exist, every field is documented."""

from __future__ import annotations

import re

from services import protogen

protogen.generate()


def test_generated_stubs_are_fresh():
    assert protogen.check() == []


def test_contract_names():
    from services.gen.lmstack.v1 import inference_pb2, tokenizer_pb2

    tok = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"]
    assert {m.name for m in tok.methods} == {"Encode", "EncodeBatch", "Decode", "CountTokens"}
    inf = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert {m.name for m in inf.methods} == {"Complete", "CompleteStream", "FewShot", "Score", "ListModels",
                                             "Inspect", "DeleteModel"}
    assert inf.methods_by_name["CompleteStream"].server_streaming
    fields = lambda name: set(inference_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name)  # noqa: E731
    assert {"model", "prompt", "sampling"} <= fields("CompleteRequest")
    assert {"text", "token_ids", "finish_reason", "usage", "logprobs"} <= fields("CompleteResponse")
    assert {"text", "token_ids", "finish_reason", "usage"} <= fields("CompleteChunk")
    assert {"model", "instruction", "examples", "query", "style", "sampling"} <= fields("FewShotRequest")
    assert {"text", "examples_used", "prompt_tokens"} <= fields("FewShotResponse")
    assert {"choices", "best"} <= fields("ScoreResponse")
    assert {"name", "context_length", "vocab_size", "parameters"} <= fields("ModelInfo")
    assert {"model", "text", "token_ids", "top_k", "layers", "heads", "attention", "logit_lens"} <= fields("InspectRequest")
    assert {"tokens", "positions", "attention", "logit_lens"} <= fields("InspectResponse")
    sp = set(inference_pb2.DESCRIPTOR.dependencies[0].message_types_by_name["SamplingParams"].fields_by_name)
    assert {"max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "logprobs"} <= sp


def test_every_rpc_and_field_has_a_comment():
    for name in ("common", "tokenizer", "inference"):
        lines = (protogen.PROTO_DIR / "lmstack" / "v1" / f"{name}.proto").read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            if re.match(r"^(rpc |service |message |(optional |repeated )?[\w.]+ \w+ = \d+;)", s):
                if s.startswith("message ") and s.endswith("{}"):
                    continue
                prev = lines[i - 1].strip()
                assert prev.startswith("//") or s.startswith("message "), f"{name}.proto:{i + 1} undocumented: {s}"
