"""GPTConfig: the handful of numbers that fix a GPT-2-style model's shape.

A GPT is a stack of ``n_layer`` identical transformer blocks over ``n_embd``-wide token vectors.
Each block's attention is split into ``n_head`` heads of width ``n_embd // n_head``; the model
reads at most ``block_size`` tokens (its context), and the tokenizer's ``vocab_size`` fixes the
size of the input embedding table and, through weight tying, of the output logits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    block_size: int = 1024  # context length: the largest position the model has an embedding for
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # used only in training (embeddings, attention probs, residual outputs)
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                "so every head gets the same width"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # --- Hugging Face config.json (GPT2Config field names) -------------------------------------
    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "bos_token_id": self.vocab_size - 1,
            "eos_token_id": self.vocab_size - 1,
            "lmstack": {"bias": self.bias},
        }

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> GPTConfig:
        model_type = d.get("model_type")
        if model_type != "gpt2":
            raise ValueError(f"{source}: model_type is {model_type!r}; lmcore loads only 'gpt2' checkpoints")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU")
        if d.get("n_inner") not in (None, 4 * d.get("n_embd", 768)):
            raise ValueError(f"{source}: n_inner={d['n_inner']} is not 4*n_embd; lmcore's MLP is 4x wide")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported")
        if d.get("scale_attn_weights") is False:
            raise ValueError(f"{source}: scale_attn_weights=false is not supported")
        try:
            return cls(
                vocab_size=d["vocab_size"],
                block_size=d.get("n_positions", d.get("n_ctx", 1024)),
                n_layer=d["n_layer"],
                n_head=d["n_head"],
                n_embd=d["n_embd"],
                dropout=d.get("resid_pdrop", 0.0),
                bias=d.get("lmstack", {}).get("bias", True),
                layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPTConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # A few hundred thousand parameters: fast enough for every test on a 2-core CPU.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=512),
    # The shipped default model's shape (see README: "The default model").
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=4096),
}

__all__ = ["GPTConfig", "PRESETS", "asdict"]
