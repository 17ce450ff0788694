"""Chat templates: a conversation (a list of ``{"role", "content"}`` messages) -> the prompt text.

A chat model was trained on conversations laid out in one particular way (``<|im_start|>user ...``,
``### Instruction:`` ...); that layout travels with the model as a Jinja template in
``tokenizer_config.json`` (``chat_template``), and the prompt must be rendered exactly as the model
saw it in training. We render it the way ``transformers``' ``apply_chat_template`` does, so a model
directory behaves the same here as there:

* Jinja's **immutable sandbox** (a template is code from the model directory: it may not touch
  Python objects' internals or mutate what it is given), ``trim_blocks`` and ``lstrip_blocks`` on,
  the ``loopcontrols`` extension;
* the template sees ``messages``, ``add_generation_prompt`` and the tokenizer's special tokens
  (``bos_token``, ``eos_token``, ... from ``tokenizer_config.json``), plus transformers' helpers
  ``raise_exception(message)``, ``strftime_now(format)`` and the ``tojson`` filter.

A ``chat_template`` given as a list of named templates uses the one named ``default``. A template
that raises (``raise_exception("roles must alternate")``) or fails to render is a ``ValueError``
naming the reason: the caller's conversation does not fit the model's format.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the model's chat template does not compile: {e}") from None

    def __reduce__(self):  # pickled as its source (a compiled jinja2 template is not picklable)
        return type(self), (self.source, self.special_tokens)

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate | None:
        """The template of a model directory's ``tokenizer_config.json``, or None when it has none."""
        path = Path(directory) / TOKENIZER_CONFIG_FILE
        if not path.is_file():
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str) or not source.strip():
            return None
        special = {}
        for key in SPECIAL_TOKEN_KEYS:
            value = config.get(key)
            if isinstance(value, dict):  # an AddedToken written out: {"content": "<|endoftext|>", ...}
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (ending with the assistant's turn opened, by default)."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the model's chat template refused these messages: {e}") from None
        except (TypeError, KeyError, AttributeError) as e:  # a message without the fields the template reads
            raise ValueError(f"the model's chat template could not render these messages: {e}") from None
