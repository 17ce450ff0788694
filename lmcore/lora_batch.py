"""Many LoRA adapters, one base model, one batch: every token row picks its own adapter (S-LoRA, LoRAX).

:func:`lmcore.lora.load_adapter_model` gives each adapter its own model object that *shares* the
base weights, which is enough to serve many fine-tunes from one copy of the base, but each model
then needs its own batch. Here the base model carries a bank of adapters instead::

    model = attach_lora_bank(base)                  # wraps the attention/MLP projections, in place
    a = add_adapter(model, "ft:tiny:sql:1a2b", adapter_dir_1)      # -> adapter index 0
    b = add_adapter(model, "ft:tiny:poem:3c4d", adapter_dir_2)     # -> adapter index 1
    set_adapter_ids(model, torch.tensor([[a], [b], [-1]]))         # (B, 1): one adapter per row
    logits = model(idx)                                            # idx (B, T); -1 = the base alone

The ids tensor must broadcast to the token layout of the forward call (``(B, 1)`` or ``(B, T)``
for ``model(idx)``; ``(N,)`` for a runner that feeds flat ``(N, C)`` token rows). Each projection
computes ``base(x)`` for all rows at once, then, **for each adapter present in the batch**, the
low-rank update of just its rows (``x[rows] @ A^T @ B^T * alpha/r``, added with ``index_add_``).
A batch holding k distinct adapters costs one base GEMM plus k small ones: the base weights are
read once per step whatever the mix, which is the point of batching adapters together.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .lora import ADAPTER_WEIGHTS_FILE, TARGETS, read_adapter_config


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus any number of LoRA adapters, chosen per row by ``adapter_ids``."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        # adapter index -> (A (r, in), B (out, r), scaling); plain tensors: serving state, not parameters
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.adapter_ids: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        ids = self.adapter_ids
        if ids is None or not self.adapters:
            return y
        ids = ids.to(x.device).expand(x.shape[:-1]).reshape(-1)  # (N,) one adapter index per token row
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)  # (N, in), (N, out)
        for index in ids.unique().tolist():
            if index < 0 or index not in self.adapters:
                continue  # the base model alone (or an adapter that does not touch this projection)
            A, B, scaling = self.adapters[index]
            rows = (ids == index).nonzero().squeeze(1)  # (n,)
            update = (x2.index_select(0, rows) @ A.t()) @ B.t()  # (n, in) -> (n, r) -> (n, out)
            y2 = y2.index_add(0, rows, update, alpha=scaling)
        return y2.view_as(y)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={sorted(self.adapters)}"


def _banks(model: nn.Module):
    for i, block in enumerate(model.transformer.h):
        for t in TARGETS:
            sub, attr = t.split(".")
            yield f"transformer.h.{i}.{t}", getattr(block, sub), attr


def attach_lora_bank(model: nn.Module) -> nn.Module:
    """Wrap every attention and MLP projection in :class:`MultiLoRALinear` (in place; weights shared)."""
    for name, parent, attr in _banks(model):
        module = getattr(parent, attr)
        if isinstance(module, MultiLoRALinear):
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}; attach the bank to a plain base model")
        setattr(parent, attr, MultiLoRALinear(module))
    model.adapter_names = getattr(model, "adapter_names", [])
    return model


def add_adapter(model: nn.Module, name: str, adapter_dir: str | Path) -> int:
    """Load an adapter directory into the bank; returns its index for :func:`set_adapter_ids`."""
    from safetensors.torch import load_file

    if not hasattr(model, "adapter_names"):
        raise ValueError("call attach_lora_bank(model) first")
    if name in model.adapter_names:
        return model.adapter_names.index(name)
    meta = read_adapter_config(adapter_dir)
    scaling = float(meta["lora_alpha"]) / int(meta["r"])
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS_FILE))
    index = len(model.adapter_names)
    staged = {}
    for qualified, parent, attr in _banks(model):
        a, b = tensors.pop(qualified + ".lora_A", None), tensors.pop(qualified + ".lora_B", None)
        if a is None and b is None:
            continue
        layer = getattr(parent, attr)
        if a is None or b is None or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise ValueError(f"{adapter_dir}: adapter tensors for {qualified} do not fit the base model")
        w = layer.base.weight
        staged[(qualified, id(layer))] = (layer, a.to(w.device, w.dtype), b.to(w.device, w.dtype))
    if tensors:
        raise ValueError(f"{adapter_dir}: unexpected adapter tensors {sorted(tensors)[:3]}")
    for layer, a, b in staged.values():
        layer.adapters[index] = (a, b, scaling)
    model.adapter_names.append(name)
    return index


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop an adapter's tensors; its index is not reused (ids already handed out stay valid)."""
    index = model.adapter_names.index(name)
    for _, parent, attr in _banks(model):
        getattr(parent, attr).adapters.pop(index, None)
    model.adapter_names[index] = None


def set_adapter_ids(model: nn.Module, ids: torch.Tensor | None) -> None:
    """Choose each row's adapter for the next forward calls (-1 or None: the base model)."""
    for _, parent, attr in _banks(model):
        layer = getattr(parent, attr)
        if isinstance(layer, MultiLoRALinear):
            layer.adapter_ids = ids
