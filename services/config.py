"""Service settings: one pydantic-settings class per server, read from flags and ``LMSTACK_*`` variables.

Precedence: command-line flags, then environment variables, then defaults. Field ``max_batch_size``
is ``--max-batch-size`` on the command line and ``LMSTACK_MAX_BATCH_SIZE`` in the environment.
List fields take comma-separated values in either place (``--models small=/m/small,tiny=/m/tiny``
or ``LMSTACK_API_KEYS=k1,k2``) or a JSON list.

Reuse (the fine-tuning service does)::

    class FineTuneSettings(ServiceSettings):
        redis_url: str = "redis://127.0.0.1:6379/0"

    settings = FineTuneSettings.from_args(argv)   # flags + LMSTACK_* env

``ServiceSettings`` carries what every server built by ``services.server`` needs: host, port,
API keys (and the tenants' keys file), TLS, metrics port, message size, shutdown grace period, torch threads, log level.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 1M-token EncodeBatch fits; gRPC's own default is 4 MiB


def _split_list(value):
    """Accept ``"a,b"``, ``["a,b", "c"]`` or a JSON list string; return a flat list of stripped items."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            value = json.loads(value)
        else:
            value = [value]
    out: list[str] = []
    for item in value:
        out.extend(part.strip() for part in str(item).split(",") if part.strip())
    return out


class ServiceSettings(BaseSettings):
    """Settings shared by every lmstack gRPC server."""

    model_config = SettingsConfigDict(
        env_prefix="LMSTACK_", extra="ignore", cli_kebab_case=True, cli_implicit_flags=True,
        cli_ignore_unknown_args=False,
    )

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys; when set, every RPC except health and reflection needs "
                    "'authorization: Bearer <key>' metadata",
    )
    api_keys_file: str = Field("", description="keys file (YAML/JSON): sha256 of each key -> tenant, role, "
                                               "quotas (services.tenants; `lmstack keys create`)")
    tls_cert: str = Field("", description="TLS certificate (PEM); with --tls-key, serve TLS only")
    tls_key: str = Field("", description="TLS private key (PEM)")
    tls_client_ca: str = Field("", description="CA (PEM) client certificates must chain to (mutual TLS)")
    insecure: bool = Field(False, description="allow a non-loopback address without API keys or without TLS")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 disables it")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0,
                                   description="largest request or response message, in bytes")
    grace_period_s: float = Field(10.0, ge=0, description="on SIGTERM, how long in-flight RPCs may finish")
    max_concurrent_rpcs: int = Field(1000, ge=1, description="RPCs served at once (streams included, health "
                                                           "watches too); past it RESOURCE_EXHAUSTED")
    keepalive_time_s: float = Field(60.0, gt=0, description="ping a connection idle this long (finds dead peers)")
    keepalive_timeout_s: float = Field(20.0, gt=0, description="close a connection whose ping is unanswered "
                                                              "this long")
    max_connection_age_s: float = Field(1800.0, gt=0, description="ask clients to reconnect after this long "
                                                                 "(GOAWAY; spreads load after a scale-up)")
    max_connection_age_grace_s: float = Field(600.0, ge=0, description="then let its RPCs finish for this long")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads (the decode loop's cores)")
    log_level: str = Field("INFO", description="logging level")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        return _split_list(v)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, **overrides):
        """Settings from ``argv`` flags (``None``: no flags) over ``LMSTACK_*`` env over defaults."""
        if argv is None:
            return cls(**overrides)
        return cls(_cli_parse_args=list(argv), **overrides)


class ModelServiceSettings(ServiceSettings):
    """Settings of a server that serves models by name (tokenizer and inference services)."""

    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="model directories as name=path pairs or plain paths (named after the directory); "
                    "comma-separated",
    )
    default_model: str = Field("", description="model used when a request names none (default: the first)")
    model_store: str = Field("", description="model store directory scanned for fine-tuned models "
                                             "(ft:<base>:<suffix>:<id> subdirectories)")
    store_refresh_interval_s: float = Field(
        2.0, ge=0, description="at most one model store rescan per this many seconds unless the store "
                               "directory changed (a publish): unknown names meanwhile are NOT_FOUND at once")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v):
        return _split_list(v)


class TokenizerSettings(ModelServiceSettings):
    """``python -m services.tokenizer``: models may also be tokenizer files (``.tiktoken``, ``tokenizer.json``)."""

    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    max_batch_texts: int = Field(4096, ge=1, description="most texts in one EncodeBatch")
    max_text_bytes: int = Field(16 * 1024 * 1024, ge=1,
                                description="most UTF-8 bytes of text in one Encode, EncodeBatch or CountTokens")
    max_decode_ids: int = Field(1_000_000, ge=1, description="most token ids in one Decode")


class InferenceSettings(ModelServiceSettings):
    """``python -m services.inference``."""

    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    max_batch_size: int = Field(16, ge=1, description="most requests each engine decodes in one step")
    max_waiting: int = Field(64, ge=0, description="most requests queued per engine before "
                                                   "RESOURCE_EXHAUSTED")
    device: str = Field("cpu", description="torch device for the models (cpu, cuda, cuda:1)")
    max_loaded_models: int = Field(4, ge=0, description="fine-tuned full models from the store kept loaded at "
                                                        "once (each has its own engine and KV cache): loaded on "
                                                        "first use, least recently used unloaded; 0: no limit, "
                                                        "all loaded at start. Adapters are banked, not counted")
    max_score_choices: int = Field(64, ge=1, description="most choices in one Score request")
    max_few_shot_examples: int = Field(256, ge=0, description="most examples in one FewShot request")
    score_threads: int = Field(1, ge=1, description="Score requests computed at once (their own threads, "
                                                    "beside the engines)")
    score_max_waiting: int = Field(16, ge=0, description="Score requests queued beyond those running "
                                                         "before RESOURCE_EXHAUSTED")
    inspect_max_waiting: int = Field(16, ge=0, description="Inspect requests queued behind the one running "
                                                           "before RESOURCE_EXHAUSTED")
    score_batch_tokens: int = Field(2048, ge=1, description="tokens per Score forward pass (memory is "
                                                            "O(tokens), never O(tokens x vocabulary))")
    quantize: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="weights quantized at load: 'int8' for every model, or NAME=int8 per model "
                    "(comma-separated; CPU only, see lmcore.model.quantize); default fp32",
    )

    speculation: str = Field("auto", description="speculative decoding default (lmcore.engine.speculative): "
                                                 "auto (prompt lookup for greedy requests), off, prompt_lookup, draft")
    speculative_tokens: int = Field(8, ge=1, le=16, description="most tokens proposed per step")
    draft_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="draft models for speculation as TARGET=PATH pairs (a smaller model with the "
                    "target's tokenizer; comma-separated)",
    )
    draft_min_confidence: float = Field(0.5, ge=0.0, le=1.0, description="a draft's proposal stops before "
                                        "the first token it gives less probability than this (0: never)")

    @field_validator("quantize", "draft_models", mode="before")
    @classmethod
    def _split_lists(cls, v):  # comma-separated in the environment, a list from flags
        return _split_list(v)

    @field_validator("speculation")
    @classmethod
    def _check_speculation(cls, v):
        from lmcore.engine.speculative import SPECULATION_MODES as modes  # lmcore owns the rule

        if v not in modes:
            raise ValueError(f"speculation must be one of {list(modes)}, got {v!r}")
        return v

    def draft_model_of(self, model_name: str) -> str | None:
        """The draft model directory ``--draft-models`` gives this model (None: no draft)."""
        for item in self.draft_models:
            name, sep, path = item.partition("=")
            if sep and name == model_name:
                return path
        return None

    def quantization_of(self, model_name: str) -> str | None:
        """The quantization ``--quantize`` asks for this model (None: as stored)."""
        chosen = None
        for item in self.quantize:
            name, sep, kind = item.rpartition("=")
            if not sep or name == model_name:
                chosen = kind
        return chosen
    http_port: int = Field(0, ge=0, le=65535, description="OpenAI-compatible HTTP API port on the same "
                                                          "engines (services.http); 0: off")
