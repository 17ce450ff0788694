"""The request bodies of the OpenAI-compatible API, as pydantic models: their *form* only.

What a field may hold as a number (temperature's range, stop strings' count, logprobs' bound, the
context) is lmcore's rule and is checked there (``lmcore.SamplingParams``, ``Engine.check_request``)
after these bodies become a ``CompleteRequest``; here are only JSON types, the wire's integer
widths and this layer's own fan-out bound (``MAX_CHOICES``). Unknown fields are refused with a 400
naming them (``extra="forbid"``), and NaN or infinity are refused as numbers: nothing is silently
ignored. Fields OpenAI has and lmstack does not support are declared so their *use* gets a clear
400 (``refused_fields``) while their harmless defaults (``best_of: 1``, ``logit_bias: {}``) pass.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

INT32 = 2**31 - 1
INT64 = 2**63 - 1
MAX_CHOICES = 64  # prompts x n in one request
MAX_PROMPTS = 64

Int32 = Annotated[int, Field(ge=-INT32 - 1, le=INT32, strict=True)]
TokenIds = list[Int32]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: ``{"name", "schema", "strict", "description"}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None  # lmstack always follows the schema strictly


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema`` (with its schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema (with its "schema") is required with type "json_schema", '
                             "and only then")
        return self


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class _Sampling(_Body):
    """Fields completions and chat completions share."""

    model: StrictStr = ""  # empty: the server's default model
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted, not used (OpenAI's abuse monitoring)
    logit_bias: dict[str, float] | None = None  # refused unless empty
    # lmstack (and vLLM) extensions
    top_k: int | None = Field(None, ge=0, le=INT32)
    repetition_penalty: float | None = None
    ignore_eos: StrictBool | None = None
    speculation: StrictStr | None = None  # speculative decoding: auto, off, prompt_lookup, draft
    speculative_tokens: int | None = Field(None, ge=-INT32, le=INT32)
    # Structured output: OpenAI's response_format (vLLM accepts it on completions too) and vLLM's
    # guided_* fields, all onto lmstack.v1.SamplingParams' constraint fields (at most one).
    response_format: ResponseFormat | None = None
    guided_json: StrictStr | dict[str, Any] | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_decoding_backend: StrictStr | None = None  # lmstack has one: "xgrammar" (or "auto")
    guided_whitespace_pattern: StrictStr | None = None  # refused: lmstack's JSON layout is fixed

    def constraints_given(self) -> list[str]:
        given = [f for f in GUIDED_FIELDS if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        return given

    def refused_fields(self) -> list[tuple[str, str]]:
        """``(field, why)`` for fields set to something lmstack does not do."""
        refused = []
        if self.logit_bias:
            refused.append(("logit_bias", "logit_bias is not supported"))
        given = self.constraints_given()
        if len(given) > 1:
            refused.append((given[1], f"give at most one of response_format (json_object / json_schema), "
                                      f"{', '.join(GUIDED_FIELDS)}; got {', '.join(given)}"))
        if self.guided_decoding_backend not in (None, "xgrammar", "auto"):
            refused.append(("guided_decoding_backend", "lmstack's only guided decoding backend is xgrammar"))
        if self.guided_whitespace_pattern is not None:
            refused.append(("guided_whitespace_pattern", "guided_whitespace_pattern is not supported (JSON is "
                                                         "generated on one line with ', ' and ': ')"))
        if self.stream_options is not None and not self.stream:
            refused.append(("stream_options", "stream_options is only allowed with stream: true"))
        return refused


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=0, le=INT32)  # 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=INT32)
    echo: StrictBool = False
    best_of: int | None = Field(None, ge=1, le=INT32)
    suffix: StrictStr | None = None

    def refused_fields(self) -> list[tuple[str, str]]:
        refused = super().refused_fields()
        if self.best_of is not None and self.best_of != 1 and self.best_of != self.n:
            refused.append(("best_of", "best_of > 1 is not supported (use n for several choices)"))
        if self.suffix:
            refused.append(("suffix", "suffix (insertion) is not supported"))
        return refused


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # templates may read more (name, tool_calls ...)

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=INT32)
    tools: list[dict[str, Any]] | None = None  # refused unless empty
    tool_choice: Any = None

    def refused_fields(self) -> list[tuple[str, str]]:
        refused = super().refused_fields()
        if self.tools:
            refused.append(("tools", "tools (function calling) are not supported"))
        if self.tool_choice not in (None, "none", "auto"):
            refused.append(("tool_choice", "tool_choice is not supported"))
        if self.top_logprobs is not None and not self.logprobs:
            refused.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        for m in self.messages:
            if isinstance(m.content, list) and any(p.get("type") != "text" for p in m.content):
                refused.append(("messages", "only text content parts are supported"))
                break
        return refused


class TokenizeRequest(_Body):
    """``POST /tokenize`` (vLLM's shape): a text, or chat messages rendered by the model's template."""

    model: StrictStr = ""
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True  # GPT-2 adds none; accepted for vLLM's clients
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Body):
    """``POST /detokenize`` (vLLM's shape)."""

    model: StrictStr = ""
    tokens: TokenIds


FinishReason = Literal["stop", "length"]
