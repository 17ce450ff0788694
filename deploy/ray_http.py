"""The OpenAI-compatible HTTP API on Ray Serve: ``services.http``'s app over ``DeploymentHandle``s.

The ``Gateway`` (``deploy/ray_serve.py``) is the application's ingress for both of Ray's proxies:
gRPC by method name, and HTTP as the very FastAPI app ``lmstack serve`` runs
(``services.http.app.create_app``), built on each gateway replica over a :class:`HandleInference`.
So routes, request schemas, OpenAI's shapes, SSE and the error bodies are ``services.http``'s, and
validation, sampling and limits are the ``InferenceHandler``'s in the ``Inference`` replicas: no
second copy of either.

:class:`HandleInference` is the part of ``InferenceHandler``'s interface the HTTP app calls
(``complete``, ``complete_stream``, ``list_models``, ``inspect``, ``tokenize``, ``detokenize``,
``chat_template``, ``default_model``), each a call to the ``Inference`` deployment:

* the caller: the app resolves the ``Authorization`` header with the gateway's ``KeyRing`` and sets
  the tenant (``services.tenants.set_current``); each call passes that tenant to the replica, which
  runs the handler as it;
* routing: a fine-tune goes with ``multiplexed_model_id=<model>`` (:func:`inference_for`), as on
  the gRPC path, so replicas that hold it get it;
* errors: a replica's ``RpcFailed`` (or a lost replica, or back-pressure: ``rpc_status``) is raised
  as the ``RpcFailed`` of its status, a ``ServiceError`` the app maps to OpenAI's error shape like
  any handler error (NOT_FOUND -> 404, INVALID_ARGUMENT -> 400, RESOURCE_EXHAUSTED -> 429);
* streams: closing a ``complete_stream`` early (an SSE client that went away) cancels the replica's
  generator, whose handler stream aborts its engine request.
"""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle

from deploy.ray_services import replica_error
from services import tenants


def inference_for(inference: DeploymentHandle, base_models: set[str], model: str) -> DeploymentHandle:
    """Fine-tunes are multiplexed over the replicas: route by the model's name."""
    if model and model not in base_models:
        return inference.options(multiplexed_model_id=model)
    return inference


class HandleInference:
    """``InferenceHandler``'s calls for ``services.http``, forwarded to the ``Inference`` deployment."""

    def __init__(self, inference: DeploymentHandle, base_models: set[str], default_model: str):
        self.inference, self.base_models = inference, base_models
        self.default_model = default_model

    async def _call(self, method: str, model: str, *args):
        handle = getattr(inference_for(self.inference, self.base_models, model), method)
        try:
            return await handle.remote(tenants.current(), *args)
        except Exception as exc:
            raise replica_error(exc) from None

    async def complete(self, req):
        return await self._call("complete", req.model, req)

    async def complete_stream(self, req):
        handle = inference_for(self.inference, self.base_models, req.model).options(stream=True)
        chunks = handle.complete_stream.remote(tenants.current(), req)
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:
            raise replica_error(exc) from None
        finally:
            chunks.cancel()  # closed early (the client went away): stop the generation downstream

    async def inspect(self, req):
        return await self._call("inspect", req.model, req)

    async def list_models(self, req):
        return await self._call("list_models", "", req)

    async def tokenize(self, model: str, text: str, allow_special: bool = False):
        return await self._call("tokenize", model, model, text, allow_special)

    async def detokenize(self, model: str, token_ids: list[int]):
        return await self._call("detokenize", model, model, token_ids)

    async def chat_template(self, model: str):
        return await self._call("chat_template", model, model)
