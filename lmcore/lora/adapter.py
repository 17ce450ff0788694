"""LoRA: fine-tune a few million numbers instead of all of them (Hu et al., 2021), on plain torch.

Full fine-tuning updates every weight matrix ``W`` (out, in). LoRA freezes ``W`` and learns a
low-rank correction instead::

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r), r << min(in, out)

``B`` starts at zero, so training starts exactly at the base model; ``A`` starts random so the
gradient of ``B`` is not zero. For GPT-2 small with r=8 on ``c_attn`` that is 0.3M trainable
numbers instead of 124M, and an adapter file of ~1 MB instead of 500 MB.

After training the correction can be **merged** (``W += (alpha/r) B A``: one plain Linear again,
no extra cost per token) or **kept separate** (many adapters share one copy of the base weights,
which is how a server hosts many fine-tunes at once: S-LoRA, LoRAX).

The model's code is never edited: :func:`apply_lora` swaps chosen ``nn.Linear`` modules for
:class:`LoRALinear` wrappers from the outside. An adapter directory holds ``adapter_config.json``
(rank, alpha, targets and the **base model it belongs to**) and ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmcore._io import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, atomic_path, atomic_write

# The projections LoRA may wrap, by their name inside a transformer block ``h[i]``.
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Short names users type; "c_proj" is ambiguous in GPT-2 (attention and MLP both have one): both.
_ALIASES = {"c_attn": ("attn.c_attn",), "c_fc": ("mlp.c_fc",), "c_proj": ("attn.c_proj", "mlp.c_proj"),
            "attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj"), "all": TARGETS}


def resolve_targets(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Canonical target names (``attn.c_attn`` ...) from what a user wrote; raises on unknown names."""
    out: list[str] = []
    for name in names:
        if name in TARGETS:
            expanded: tuple[str, ...] = (name,)
        elif name in _ALIASES:
            expanded = _ALIASES[name]
        else:
            raise ValueError(f"unknown LoRA target module {name!r}; choose from {list(TARGETS)} "
                             f"or {sorted(_ALIASES)}")
        out.extend(t for t in expanded if t not in out)
    if not out:
        raise ValueError("LoRA needs at least one target module")
    return tuple(t for t in TARGETS if t in out)


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("attn.c_attn", "attn.c_proj")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora_rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        self.target_modules = resolve_targets(tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """``base(x) + scaling * dropout(x) @ A^T @ B^T`` around a frozen ``nn.Linear`` (kept, not copied)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        # Same init as the paper's reference code: A ~ Kaiming-uniform, B = 0 (the product starts at 0).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # code that reads ``.weight`` (dtype/device probes) still works
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out): never materialises the (out, in) product.
        return self.base(x) + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new plain Linear with ``W + scaling * B A`` (the base Linear is left untouched)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        out.weight.copy_(b.weight + self.delta_weight().to(b.weight.dtype))
        if b.bias is not None:
            out.bias.copy_(b.bias)
        out.weight.requires_grad_(b.weight.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _target_modules(model: nn.Module, targets: tuple[str, ...]):
    """Yield ``(parent, attr, qualified name)`` for every targeted projection in every block."""
    for i, block in enumerate(model.transformer.h):
        for t in targets:
            sub, attr = t.split(".")
            parent = getattr(block, sub)
            yield parent, attr, f"transformer.h.{i}.{t}"


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the targeted Linears in :class:`LoRALinear` and freeze everything else (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, name in _target_modules(model, config.target_modules):
        module = getattr(parent, attr)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        setattr(parent, attr, LoRALinear(module, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors: ``transformer.h.0.attn.c_attn.lora_A`` ..."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and put plain Linears back (in place)."""
    for block in model.transformer.h:
        for t in TARGETS:
            sub, attr = t.split(".")
            parent = getattr(block, sub)
            module = getattr(parent, attr)
            if isinstance(module, LoRALinear):
                setattr(parent, attr, module.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def save_adapter(model: nn.Module, path: str | Path, base_model: str, extra: dict | None = None) -> None:
    """Write ``adapter_config.json`` (naming ``base_model``) + ``adapter_model.safetensors``, atomically."""
    from safetensors.torch import save_file

    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("model has no LoRA adapter (call apply_lora first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    with atomic_path(path / ADAPTER_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    meta = {
        "format": "lmstack-lora",
        "peft_type": "LORA",
        "base_model": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules),
        **(extra or {}),
    }
    atomic_write(path / ADAPTER_CONFIG_FILE, json.dumps(meta, indent=2) + "\n")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def read_adapter_config(path: str | Path) -> dict:
    """The adapter's JSON config, checked; ``base_model`` says which model it was trained on."""
    f = Path(path) / ADAPTER_CONFIG_FILE
    if not f.is_file():
        raise ValueError(f"{path}: not a LoRA adapter directory (no {ADAPTER_CONFIG_FILE})")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    for key in ("base_model", "r", "lora_alpha", "target_modules"):
        if key not in meta:
            raise ValueError(f"{f}: missing field {key!r}")
    return meta


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapter stored at ``path`` to ``model`` (in place; its base weights are not copied)."""
    from safetensors.torch import load_file

    meta = read_adapter_config(path)
    config = LoRAConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                        dropout=float(meta.get("lora_dropout", 0.0)),
                        target_modules=tuple(meta["target_modules"]))
    apply_lora(model, config)
    weights = Path(path) / ADAPTER_WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises several types for a missing or corrupt file
        raise ValueError(f"{weights}: cannot read adapter weights: {e}") from None
    expected = lora_state_dict(model)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{weights}: adapter tensors do not match its config "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, param in expected.items():
            t = tensors[name]
            if t.shape != param.shape:
                raise ValueError(f"{weights}: {name} has shape {tuple(t.shape)}, the base model needs "
                                 f"{tuple(param.shape)}")
            param.copy_(t)
    return model


def load_adapter_model(base_model, adapter_dir: str | Path, merge: bool = False):
    """A GPT that runs base + adapter, for serving. ``base_model`` is a loaded ``GPT`` or a path.

    With a ``GPT``, the returned model **shares** the base's weight tensors (no copy, the base is
    not modified): a server keeps one base in memory however many adapters it serves. With
    ``merge=True`` the adapter is folded into fresh weight matrices (faster per token, costs a copy
    of the targeted matrices). With a path (or ``None``: the adapter's own ``base_model`` field,
    resolved next to the adapter directory when relative), the base is loaded from disk first.
    The tokenizer is the base's (an adapter never changes the vocabulary).
    """
    from lmcore.model.gpt import GPT, load_model

    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    if base_model is None:
        base_model = meta["base_model"]
    if not isinstance(base_model, GPT):
        base_path = Path(base_model)
        if not base_path.is_absolute() and not base_path.exists():
            base_path = adapter_dir.parent / base_path
        base_model = load_model(base_path)
    with torch.device("meta"):
        model = GPT(base_model.config)
    # assign=True makes the new module hold the base's very tensors (shared storage, no copy).
    model.load_state_dict(base_model.state_dict(), strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    for p in model.parameters():
        p.requires_grad_(False)
    load_adapter(model, adapter_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    if merge:
        merge_lora(model)
    model.eval()
    model.tokenizer = getattr(base_model, "tokenizer", None)
    model.name_or_path = str(adapter_dir)
    model.adapter_config = meta
    return model


__all__ = [
    "LoRAConfig", "LoRALinear", "TARGETS", "apply_lora", "merge_lora", "lora_state_dict", "save_adapter",
    "load_adapter", "load_adapter_model", "read_adapter_config", "is_adapter_dir", "resolve_targets",
    "ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE",
]
