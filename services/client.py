"""A small Python client for lmstack's gRPC services, with sensible defaults.

    from services.client import Client

    with Client("127.0.0.1:50051", api_key="...") as c:           # the inference service
        c.wait_ready()                                               # health SERVING (models loaded)
        print(c.complete("Once upon a time", max_tokens=32, temperature=0).text)
        for chunk in c.complete_stream("Hello", max_tokens=16):
            print(chunk.text, end="", flush=True)
        c.few_shot("cat", [("dog", "chien"), ("house", "maison")], instruction="English to French")
        c.score("The sky is", [" blue", " green"]).best
        c.inspect("The sky is blue", top_k=5, attention=True, layers=[0], logit_lens=True)
        [m.name for m in c.list_models()]

    with Client("127.0.0.1:50052") as t:                           # the tokenizer service
        ids = t.encode("hello world")
        t.decode(ids), t.count_tokens("hello world")

Behind Ray Serve's gRPC proxy (``deploy/serve.yaml``), pass ``application="lmstack"``: every call
then carries Ray's routing metadata, ``application`` (which Serve application answers) and
``multiplexed_model_id`` set from the request's ``model`` (so Serve's router sends a fine-tune's
requests to the replicas that already hold it); a model is named exactly as against ``lmstack serve``.

TLS: ``Client(target, api_key=..., tls_ca="ca.pem")`` verifies the server against that CA; add
``tls_cert``/``tls_key`` for a server that wants client certificates (mTLS). An admin key may pass
``tenant="team-a"`` to act for that tenant (``services.tenants``).

``AsyncClient`` has the same methods as coroutines (``complete_stream`` is an async iterator) for
``asyncio`` programs. Sampling options are keyword arguments named like the proto's
``SamplingParams`` fields (``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
``stop``, ``logprobs``, ...; structured output: ``json_schema`` (a dict or JSON text), ``json_object``,
``regex``, ``grammar``, ``choice``); unset ones keep the server's defaults. Errors raise
``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError`` (async) with ``.code()`` and ``.details()``.
The request builders (``complete_request``, ``few_shot_request``, ...) are public for callers that
use the raw stubs (``client.inference``, ``client.tokenizer``, ``client.health``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.config import DEFAULT_MAX_MESSAGE_BYTES
from services.gen.lmstack.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from services.server import channel_options
from services.tls import channel_credentials

DEFAULT_TIMEOUT_S = 120.0
_SAMPLING_FIELDS = set(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


# --- request builders ------------------------------------------------------------------------------
def sampling_params(**kw) -> common_pb2.SamplingParams:
    """``SamplingParams`` from keyword arguments; ``None`` values are left unset."""
    unknown = set(kw) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; known: {sorted(_SAMPLING_FIELDS)}")
    kw = {k: v for k, v in kw.items() if v is not None}
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    if isinstance(kw.get("json_schema"), dict):  # the wire carries JSON text
        kw["json_schema"] = json.dumps(kw["json_schema"])
    return common_pb2.SamplingParams(**kw)


def complete_request(prompt: str | list[int], model: str = "", allow_special: bool = False,
                     **sampling) -> inference_pb2.CompleteRequest:
    req = inference_pb2.CompleteRequest(model=model, sampling=sampling_params(**sampling),
                                        allow_special=allow_special)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(prompt)
    return req


def few_shot_request(query: str, examples: Iterable[tuple[str, str]] = (), instruction: str = "",
                     style: str = "", model: str = "", **sampling) -> inference_pb2.FewShotRequest:
    return inference_pb2.FewShotRequest(
        model=model, instruction=instruction, query=query, style=style, sampling=sampling_params(**sampling),
        examples=[inference_pb2.Example(input=i, output=o) for i, o in examples])


def inspect_request(text: str | list[int], model: str = "", top_k: int = 0, layers: Iterable[int] = (),
                    heads: Iterable[int] = (), attention: bool = False, logit_lens: bool = False,
                    allow_special: bool = False) -> inference_pb2.InspectRequest:
    req = inference_pb2.InspectRequest(model=model, top_k=top_k, layers=list(layers), heads=list(heads),
                                       attention=attention, logit_lens=logit_lens, allow_special=allow_special)
    if isinstance(text, str):
        req.text = text
    else:
        req.token_ids.extend(text)
    return req


def _metadata(api_key: str | None, application: str | None = None) -> tuple:
    auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    return auth + ((("application", application),) if application else ())


class _Base:
    def __init__(self, target: str, api_key: str | None, timeout: float, grpc_module,
                 max_message_bytes: int, application: str | None = None, tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", tenant: str = ""):
        self.target = target
        self.timeout = timeout
        self.application = application
        self.metadata = _metadata(api_key, application) + ((("lmstack-tenant", tenant),) if tenant else ())
        options = channel_options(max_message_bytes)
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        if credentials is None:
            self.channel = grpc_module.insecure_channel(target, options=options)
        else:
            self.channel = grpc_module.secure_channel(target, credentials, options=options)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _kw(self, timeout: float | None, model: str = "") -> dict:
        """Call options; behind Ray Serve, ``model`` becomes the multiplexing (routing) key."""
        metadata = self.metadata
        if self.application and model:
            metadata = (*metadata, ("multiplexed_model_id", model))
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": metadata}


class Client(_Base):
    """Blocking client for the inference and tokenizer services (one channel, both stubs)."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, application: str | None = None,
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = "", tenant: str = ""):
        super().__init__(target, api_key, timeout, grpc, max_message_bytes, application, tls_ca, tls_cert, tls_key,
                         tenant)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # health
    def health_status(self, service: str = "", timeout: float | None = 5.0) -> str:
        """``SERVING``, ``NOT_SERVING``, ... for ``service`` (empty: the whole server)."""
        resp = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Poll health until ``SERVING`` (models loaded); ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = "unreachable"
        while time.monotonic() < deadline:
            try:
                last = self.health_status(service, timeout=1.0)
                if last == "SERVING":
                    return
            except grpc.RpcError as e:
                last = e.code().name
            time.sleep(0.05)
        raise TimeoutError(f"{self.target} not SERVING after {timeout}s (last: {last})")

    # tokenizer service
    def encode(self, text: str, model: str = "", allow_special: bool = False, timeout=None) -> list[int]:
        req = tokenizer_pb2.EncodeRequest(model=model, text=text, allow_special=allow_special)
        return list(self.tokenizer.Encode(req, **self._kw(timeout, model)).token_ids)

    def encode_batch(self, texts: list[str], model: str = "", allow_special: bool = False,
                     timeout=None) -> list[list[int]]:
        req = tokenizer_pb2.EncodeBatchRequest(model=model, texts=texts, allow_special=allow_special)
        return [list(i.token_ids) for i in self.tokenizer.EncodeBatch(req, **self._kw(timeout, model)).items]

    def decode(self, token_ids: list[int], model: str = "", timeout=None) -> str:
        req = tokenizer_pb2.DecodeRequest(model=model, token_ids=token_ids)
        return self.tokenizer.Decode(req, **self._kw(timeout, model)).text

    def count_tokens(self, text: str, model: str = "", allow_special: bool = False, timeout=None) -> int:
        req = tokenizer_pb2.CountTokensRequest(model=model, text=text, allow_special=allow_special)
        return self.tokenizer.CountTokens(req, **self._kw(timeout, model)).count

    # inference service
    def complete(self, prompt: str | list[int], model: str = "", timeout=None, allow_special: bool = False,
                 **sampling) -> inference_pb2.CompleteResponse:
        req = complete_request(prompt, model, allow_special, **sampling)
        return self.inference.Complete(req, **self._kw(timeout, model))

    def complete_stream(self, prompt: str | list[int], model: str = "", timeout=None,
                        allow_special: bool = False, **sampling):
        """An iterator of ``CompleteChunk``; call ``.cancel()`` on it to stop generation server-side."""
        req = complete_request(prompt, model, allow_special, **sampling)
        return self.inference.CompleteStream(req, **self._kw(timeout, model))

    def few_shot(self, query: str, examples: Iterable[tuple[str, str]] = (), instruction: str = "",
                 style: str = "", model: str = "", timeout=None, **sampling) -> inference_pb2.FewShotResponse:
        req = few_shot_request(query, examples, instruction, style, model, **sampling)
        return self.inference.FewShot(req, **self._kw(timeout, model))

    def score(self, context: str, choices: list[str], model: str = "", timeout=None) -> inference_pb2.ScoreResponse:
        req = inference_pb2.ScoreRequest(model=model, context=context, choices=choices)
        return self.inference.Score(req, **self._kw(timeout, model))

    def inspect(self, text: str | list[int], model: str = "", timeout=None, **options) -> inference_pb2.InspectResponse:
        """Look inside the model on ``text``; options: ``top_k``, ``layers``, ``heads``, ``attention``,
        ``logit_lens``, ``allow_special`` (see ``InspectRequest``)."""
        return self.inference.Inspect(inspect_request(text, model, **options), **self._kw(timeout, model))

    def list_models(self, timeout=None) -> list[inference_pb2.ModelInfo]:
        return list(self.inference.ListModels(inference_pb2.ListModelsRequest(), **self._kw(timeout)).models)

    def delete_model(self, name: str, timeout=None) -> inference_pb2.DeleteModelResponse:
        """Unload a fine-tuned model and remove it from the store (your own; an admin: any)."""
        return self.inference.DeleteModel(inference_pb2.DeleteModelRequest(name=name), **self._kw(timeout))


class AsyncClient(_Base):
    """``grpc.aio`` client with the same methods as ``Client``, as coroutines."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, application: str | None = None,
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = "", tenant: str = ""):
        super().__init__(target, api_key, timeout, grpc.aio, max_message_bytes, application, tls_ca, tls_cert,
                         tls_key, tenant)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def health_status(self, service: str = "", timeout: float | None = 5.0) -> str:
        resp = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        import asyncio

        deadline = time.monotonic() + timeout
        last = "unreachable"
        while time.monotonic() < deadline:
            try:
                last = await self.health_status(service, timeout=1.0)
                if last == "SERVING":
                    return
            except grpc.RpcError as e:
                last = e.code().name
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.target} not SERVING after {timeout}s (last: {last})")

    async def encode(self, text: str, model: str = "", allow_special: bool = False, timeout=None) -> list[int]:
        req = tokenizer_pb2.EncodeRequest(model=model, text=text, allow_special=allow_special)
        return list((await self.tokenizer.Encode(req, **self._kw(timeout, model))).token_ids)

    async def decode(self, token_ids: list[int], model: str = "", timeout=None) -> str:
        req = tokenizer_pb2.DecodeRequest(model=model, token_ids=token_ids)
        return (await self.tokenizer.Decode(req, **self._kw(timeout, model))).text

    async def count_tokens(self, text: str, model: str = "", allow_special: bool = False, timeout=None) -> int:
        req = tokenizer_pb2.CountTokensRequest(model=model, text=text, allow_special=allow_special)
        return (await self.tokenizer.CountTokens(req, **self._kw(timeout, model))).count

    async def complete(self, prompt: str | list[int], model: str = "", timeout=None, allow_special: bool = False,
                       **sampling) -> inference_pb2.CompleteResponse:
        req = complete_request(prompt, model, allow_special, **sampling)
        return await self.inference.Complete(req, **self._kw(timeout, model))

    def complete_stream(self, prompt: str | list[int], model: str = "", timeout=None,
                        allow_special: bool = False, **sampling):
        """The streaming call: ``async for chunk in call``; ``call.cancel()`` stops generation."""
        req = complete_request(prompt, model, allow_special, **sampling)
        return self.inference.CompleteStream(req, **self._kw(timeout, model))

    async def few_shot(self, query: str, examples: Iterable[tuple[str, str]] = (), instruction: str = "",
                       style: str = "", model: str = "", timeout=None, **sampling) -> inference_pb2.FewShotResponse:
        req = few_shot_request(query, examples, instruction, style, model, **sampling)
        return await self.inference.FewShot(req, **self._kw(timeout, model))

    async def score(self, context: str, choices: list[str], model: str = "",
                    timeout=None) -> inference_pb2.ScoreResponse:
        req = inference_pb2.ScoreRequest(model=model, context=context, choices=choices)
        return await self.inference.Score(req, **self._kw(timeout, model))

    async def inspect(self, text: str | list[int], model: str = "", timeout=None,
                      **options) -> inference_pb2.InspectResponse:
        return await self.inference.Inspect(inspect_request(text, model, **options), **self._kw(timeout, model))

    async def list_models(self, timeout=None) -> list[inference_pb2.ModelInfo]:
        resp = await self.inference.ListModels(inference_pb2.ListModelsRequest(), **self._kw(timeout))
        return list(resp.models)

    async def delete_model(self, name: str, timeout=None) -> inference_pb2.DeleteModelResponse:
        return await self.inference.DeleteModel(inference_pb2.DeleteModelRequest(name=name), **self._kw(timeout))
