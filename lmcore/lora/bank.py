"""Many LoRA adapters, one base model, one batch: every token row picks its own adapter (S-LoRA, LoRAX).

:func:`lmcore.lora.load_adapter_model` gives each adapter its own model object that *shares* the
base weights, which is enough to serve many fine-tunes from one copy of the base, but each model
then needs its own batch. Here one base model serves a :class:`LoRABank` of adapters instead::

    bank = LoRABank(base)                            # wraps the attention/MLP projections, in place
    a = bank.add("ft:tiny:sql:1a2b", adapter_dir_1)  # -> adapter index 0
    b = bank.add("ft:tiny:poem:3c4d", adapter_dir_2) # -> adapter index 1
    bank.route(torch.tensor([[a], [b], [-1]]))       # (B, 1): one adapter per row, this thread
    logits = base(idx)                               # idx (B, T); -1 = the base alone

The ids tensor must broadcast to the token layout of the forward call (``(B, 1)`` or ``(B, T)``
for ``model(idx)``; ``(N,)`` for a runner that feeds flat ``(N, C)`` token rows). Each projection
computes ``base(x)`` for all rows at once, then, **for each adapter present in the batch**, the
low-rank update of just its rows (``x[rows] @ A^T @ B^T * alpha/r``, added with ``index_add``).
A batch holding k distinct adapters costs one base GEMM plus k small ones: the base weights are
read once per step whatever the mix, which is the point of batching adapters together. Which rows
belong to which adapter is worked out once per ids tensor and shape, not once per projection.

The chosen ids are **per thread**: an engine's step thread routes its batch while another thread
runs the same model's plain forward (a Score request) and sees the base model alone, or its own
choice (:meth:`LoRABank.use`).

The bank is an object, not state hung on the model: it holds the adapter names, the routing and
the wrapped projections, and whoever owns it (an engine's :class:`~lmcore.engine.runner.ModelRunner`,
which creates it on :meth:`lmcore.Engine.add_adapter`) asks it. :meth:`LoRABank.wrap` wraps the
runner's fast weight layouts (:mod:`lmcore.engine.weight_layout`) so the base GEMM keeps its
re-laid-out copy and only the low-rank updates are added.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from lmcore.model.quantize import Int8Linear

from .adapter import ADAPTER_WEIGHTS_FILE, TARGETS, read_adapter_config


class _Routing(threading.local):
    """One bank's per-thread choice of adapters: the ids, and the rows of each adapter present."""

    ids: torch.Tensor | None = None
    plan: tuple | None = None  # ((ids tensor, token shape), [(adapter index, rows (n,))]) of the last use

    def __reduce__(self):  # a copied model gets a fresh routing (thread-local state is not copied)
        return (_Routing, ())


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus any number of LoRA adapters, chosen per row by the bank's ids."""

    def __init__(self, base: nn.Linear, routing: _Routing | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        # adapter index -> (A (r, in), B (out, r), scaling); plain tensors: serving state, not parameters
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.routing = routing if routing is not None else _Routing()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def adapter_ids(self) -> torch.Tensor | None:
        return self.routing.ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_updates(x, self.base(x))

    def add_updates(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base projection of ``x``) plus each row's adapter update."""
        if not self.adapters:
            return y
        groups = _groups(self.routing, x)
        if not groups:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)  # (N, in), (N, out)
        for index, rows in groups:
            lora = self.adapters.get(index)
            if lora is None:
                continue  # an adapter that does not touch this projection
            A, B, scaling = lora
            update = (x2.index_select(0, rows) @ A.t()) @ B.t()  # (n, in) -> (n, r) -> (n, out)
            y2 = y2.index_add(0, rows, update, alpha=scaling)
        return y2.view_as(y)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={sorted(self.adapters)}"


def _groups(routing: _Routing, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(adapter index, rows)]`` for the adapters present (never -1), cached for the ids and shape."""
    ids = routing.ids
    if ids is None:
        return []
    shape = x.shape[:-1]
    plan = routing.plan
    if plan is not None and plan[0][0] is ids and plan[0][1] == shape:
        return plan[1]
    flat = ids.to(x.device).expand(shape).reshape(-1)  # (N,) one adapter index per token row
    groups = [(index, (flat == index).nonzero().squeeze(1)) for index in flat.unique().tolist() if index >= 0]
    routing.plan = ((ids, shape), groups)
    return groups


class BankedProjection:
    """A fast base projection (an engine's re-laid-out copy) plus the bank layer's adapter updates."""

    __slots__ = ("fast", "layer")

    def __init__(self, fast, layer: MultiLoRALinear):
        self.fast, self.layer = fast, layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        return self.layer.add_updates(x, self.fast(x))


def _banks(model: nn.Module):
    """``(qualified name, parent module, attribute)`` of every projection a bank may wrap."""
    for i, block in enumerate(model.transformer.h):
        for t in TARGETS:
            sub, attr = t.split(".")
            yield f"transformer.h.{i}.{t}", getattr(block, sub), attr


class LoRABank:
    """The adapters one base model serves in one batch: their names, their tensors, the routing.

    Building it wraps every attention and MLP projection of ``model`` in :class:`MultiLoRALinear`
    (in place; the base weights are shared, not copied). Adapters get increasing indices; a removed
    adapter's index is never reused, so an index handed out (a request's, a prefix-cache namespace)
    never silently names another adapter.
    """

    def __init__(self, model: nn.Module):
        for name, parent, attr in _banks(model):
            module = getattr(parent, attr)
            if isinstance(module, MultiLoRALinear):
                raise ValueError(f"{name} is already in a LoRA bank; one bank per model")
            if type(module) not in (nn.Linear, Int8Linear):  # an int8 base: the low-rank products stay fp32
                raise ValueError(f"{name} is a {type(module).__name__}; attach the bank to a plain base model")
        self.model = model
        self.routing = _Routing()
        self.names: list[str | None] = []  # by adapter index; None: removed
        self.layers: dict[str, MultiLoRALinear] = {}  # qualified projection name -> its bank layer
        for name, parent, attr in _banks(model):
            layer = MultiLoRALinear(getattr(parent, attr), self.routing)
            setattr(parent, attr, layer)
            self.layers[name] = layer

    # --- which adapters ---------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        """The loaded adapters' names, in index order."""
        return [n for n in self.names if n is not None]

    def index(self, adapter: str | int) -> int:
        """The index of an adapter named (or numbered) ``adapter``; ValueError if it is not loaded."""
        if isinstance(adapter, str):
            if adapter not in self.names:
                raise ValueError(f"unknown adapter {adapter!r}; loaded: {self.adapters()}")
            return self.names.index(adapter)
        if not 0 <= adapter < len(self.names) or self.names[adapter] is None:
            raise ValueError(f"unknown adapter index {adapter}; loaded: {self.adapters()}")
        return adapter

    def parameters(self, adapter: str | int) -> int:
        """How many numbers the adapter adds: its A ``(r, in)`` and B ``(out, r)`` as loaded."""
        index = self.index(adapter)
        loaded = (layer.adapters[index] for layer in self.layers.values() if index in layer.adapters)
        return sum(a.numel() + b.numel() for a, b, _ in loaded)

    # --- loading ----------------------------------------------------------------------------------
    def add(self, name: str, adapter_dir: str | Path) -> int:
        """Load an adapter directory; returns its index for :meth:`route`. A name already loaded
        returns its index again. Nothing changes if the tensors do not fit the base model."""
        from safetensors.torch import load_file

        if name in self.names:
            return self.names.index(name)
        meta = read_adapter_config(adapter_dir)
        scaling = float(meta["lora_alpha"]) / int(meta["r"])
        tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS_FILE))
        staged = []
        for qualified, layer in self.layers.items():
            a, b = tensors.pop(qualified + ".lora_A", None), tensors.pop(qualified + ".lora_B", None)
            if a is None and b is None:
                continue
            if a is None or b is None or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise ValueError(f"{adapter_dir}: adapter tensors for {qualified} do not fit the base model")
            w = layer.base.weight
            staged.append((layer, a.to(w.device, w.dtype), b.to(w.device, w.dtype)))  # A (r, in), B (out, r)
        if tensors:
            raise ValueError(f"{adapter_dir}: unexpected adapter tensors {sorted(tensors)[:3]}")
        index = len(self.names)
        for layer, a, b in staged:
            layer.adapters[index] = (a, b, scaling)
        self.names.append(name)
        return index

    def remove(self, name: str) -> None:
        """Drop an adapter's tensors; its index is not reused (ids already handed out stay valid)."""
        index = self.index(name)
        for layer in self.layers.values():
            layer.adapters.pop(index, None)
        self.names[index] = None

    # --- routing ----------------------------------------------------------------------------------
    def route(self, ids: torch.Tensor | None) -> None:
        """Choose each row's adapter for this thread's next forward calls (-1 or None: the base)."""
        self.routing.ids, self.routing.plan = ids, None

    @contextmanager
    def use(self, adapter: str | int | None):
        """Run this thread's plain ``model(...)`` calls through one adapter (None: the base alone)."""
        saved = self.routing.ids
        index = -1 if adapter is None else self.index(adapter)
        self.route(torch.tensor(index))  # 0-dim: broadcasts to any token layout
        try:
            yield self.model
        finally:
            self.route(saved)

    def wrap(self, layers: list[tuple]) -> list[tuple]:
        """An engine's per-block callables (``model.decode_layers()`` order, some replaced by fast
        re-laid-out copies of the plain Linears) made to add the bank's updates."""
        banked = self.model.decode_layers()
        out = []
        for block, bank_block in zip(layers, banked):
            row = []
            for fn, layer in zip(block, bank_block):
                if not isinstance(layer, MultiLoRALinear) or fn is layer:
                    row.append(fn)
                elif fn is layer.base:  # the plain module itself: call the bank layer instead
                    row.append(layer)
                else:
                    row.append(BankedProjection(fn, layer))
            out.append(tuple(row))
        return out
