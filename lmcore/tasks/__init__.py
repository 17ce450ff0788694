"""Tasks built on a model: few-shot prompts (``fewshot``) and scoring continuations (``scoring``)."""

from .fewshot import FewShotPrompt, PromptStyle, RenderedPrompt
from .scoring import ChoiceScore, score

__all__ = ["ChoiceScore", "FewShotPrompt", "PromptStyle", "RenderedPrompt", "score"]
