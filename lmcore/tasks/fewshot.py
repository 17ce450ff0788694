"""Few-shot prompting (GPT-3's recipe): show the model a few solved examples, then the question.

A language model is not told what task to do; it continues text. Few-shot prompting writes the
task as text that a good continuation would solve: an instruction, ``k`` examples in a fixed
format, and the query in that same format with its answer left blank::

    Translate English to French.          <- instruction

    Q: cheese                             <- example 1 (input prefix, input,
    A: fromage                               output prefix, output)

    Q: sea otter                          <- the query: the model writes the answer
    A:

The format is a :class:`PromptStyle` (prefixes and separators), chosen by name from a registry
(``"qa"``, ``"io"``, ``"arrow"``, ``"plain"``) or given directly. Rendering fits the context: given
a token budget (the context minus ``max_tokens``), it keeps as many examples as fit, in order, and
reports how many it used. It also suggests stop strings (the example separator and the next input
prefix) so the model stops after its answer instead of inventing the next question. Every query
renders to the same leading tokens (instruction and examples), which is exactly what the engine's
prefix cache reuses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptStyle:
    """How one example is written: ``{input_prefix}{input}{output_prefix}{output}``."""

    name: str
    input_prefix: str
    output_prefix: str
    example_separator: str = "\n\n"  # between examples (and after the instruction)

    def example(self, inp: str, out: str) -> str:
        return f"{self.input_prefix}{inp}{self.output_prefix} {out}"

    def query(self, inp: str) -> str:
        # No trailing space after the output prefix: GPT-2's tokens carry their leading space,
        # so " fromage" is one token the model may produce, while "A: " would force an odd split.
        return f"{self.input_prefix}{inp}{self.output_prefix}"

    def stop_strings(self) -> list[str]:
        stops = [self.example_separator]
        nxt = "\n" + self.input_prefix.strip()
        if self.input_prefix.strip() and nxt not in stops:
            stops.append(nxt)
        return stops


STYLES: dict[str, PromptStyle] = {}


def register_style(style: PromptStyle) -> PromptStyle:
    """Add (or replace) a named style."""
    STYLES[style.name] = style
    return style


register_style(PromptStyle("qa", "Q: ", "\nA:"))
register_style(PromptStyle("io", "Input: ", "\nOutput:"))
register_style(PromptStyle("arrow", "", " =>", "\n"))
register_style(PromptStyle("plain", "", "\n", "\n\n"))


def get_style(style: str | PromptStyle) -> PromptStyle:
    if isinstance(style, PromptStyle):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; valid styles: {', '.join(sorted(STYLES))}")
    return STYLES[style]


@dataclass
class RenderedPrompt:
    text: str
    token_ids: list[int]
    examples_used: int
    stop: list[str]  # suggested stop strings


class FewShotPrompt:
    """An instruction plus ``(input, output)`` examples in a :class:`PromptStyle`."""

    def __init__(self, instruction: str = "", examples: list[tuple[str, str]] | None = None,
                 style: str | PromptStyle = "qa", template: str | PromptStyle | None = None):
        self.instruction = instruction.strip()
        self.examples = [(str(i).strip(), str(o).strip()) for i, o in (examples or [])]
        self.style = get_style(template if template is not None else style)

    def text(self, query: str, k: int | None = None) -> str:
        """The prompt with the first ``k`` examples (all by default)."""
        k = len(self.examples) if k is None else k
        sep = self.style.example_separator
        parts = [self.instruction] if self.instruction else []
        parts += [self.style.example(i, o) for i, o in self.examples[:k]]
        parts.append(self.style.query(query.strip()))
        return sep.join(parts)

    def render(self, query: str, tokenizer, max_prompt_tokens: int) -> RenderedPrompt:
        """The prompt with as many examples as fit in ``max_prompt_tokens`` tokens, in order.

        Raises ``ValueError`` when even the instruction and the query alone do not fit. A text
        with more characters than ``max_prompt_tokens * tokenizer.max_token_chars`` cannot fit, so
        it is never tokenized: the work stays bounded by the budget whatever the request's size.
        """
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        max_chars = max_prompt_tokens * tokenizer.max_token_chars
        best: tuple[str, list[int], int] | None = None
        first_len = None
        for k in range(len(self.examples) + 1):
            text = self.text(query, k)
            if len(text) > max_chars:
                break
            ids = tokenizer.encode(text)
            first_len = len(ids) if k == 0 else first_len
            if len(ids) > max_prompt_tokens:
                break
            best = (text, ids, k)
        if best is None:
            if first_len is None:
                raise ValueError(
                    f"the instruction and query alone are {len(self.text(query, 0))} characters, more than "
                    f"fit in the prompt budget of {max_prompt_tokens} tokens (context minus max_tokens): "
                    "shorten them or lower max_tokens")
            n = first_len
            raise ValueError(
                f"the instruction and query alone are {n} tokens, more than the prompt budget of "
                f"{max_prompt_tokens} tokens (context minus max_tokens): shorten them or lower max_tokens"
            )
        text, ids, k = best
        return RenderedPrompt(text, ids, k, self.style.stop_strings())
