"""Fast weight layouts for decoding: re-laid-out copies of the Linear weights, kept beside the model.

``nn.Linear`` stores its weight as ``(out, in)`` and computes ``x @ W.T``. A decode step multiplies
each weight by only a few rows (one per running sequence), so the speed is the speed of *reading*
the weight, and that depends on its layout. Measured on this CPU (fp32, one thread, GPT-2-small
shapes, CPU time per call; ``bench/generate.py`` and the runner's docstring have the full story):

=====================  ===========  ==================  ========================
product                ``(out,in)``  contiguous (in,out)  oneDNN blocked (prepacked)
=====================  ===========  ==================  ========================
head 50257x768, 1 row  12.5 ms      **10.6 ms**         12.9 ms
head, 8 rows           46.8 ms      28.2 ms             **16.1 ms**
c_attn 2304x768, 8     0.86 ms      **0.43 ms**         0.47 ms
whole step, 16 rows    --           113 ms              **88 ms**
=====================  ===========  ==================  ========================

So an engine keeps (a) for one-row steps the modules themselves plus a contiguous ``(in, out)``
head (:class:`PackedLinear`), and (b) for steps of several rows oneDNN's prepacked layout
(:class:`OneDNNLinear`, CPU only; elsewhere the modules: cuBLAS reads either layout at speed).
Small models (block weights under ``SMALL_MODEL_BYTES``) are bound by per-call overhead instead,
where ``addmm`` is cheapest: :class:`PackedLinear` copies serve their one-row steps, and their
steps of several rows too for weights under ``ONEDNN_MIN_ELEMENTS`` (above it, e.g. ``pycode``'s
head, oneDNN reads several rows' worth 3x faster). An engine that may speculate sizes the layouts
for its verify segments (``max_rows`` counts ``1 + speculative_tokens`` rows per sequence).
The copies are made when an engine is built (so an engine built after a fine-tune or a LoRA merge
sees the new weights; build a new engine after changing weights) and live outside the model: the
state dict is untouched. Only plain ``nn.Linear`` modules are copied; anything else (a LoRA
wrapper, merged or not) is called as the module it is. The price is memory (up to one more copy
of the weights per layout) and build time (~0.1 s per 150 MB).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Below this many bytes of block weights, one-row steps use PackedLinear copies: a call costs ~5.7 us
# through addmm vs ~9 us through F.linear at tiny shapes, and the copies are cheap.
SMALL_MODEL_BYTES = 64 << 20
# Steps of several rows (a batch, a verify segment of speculative decoding) use oneDNN's layout for
# weights of at least this many elements and addmm below it. Measured at 5 rows, one thread, cpu
# clock: a 64x512 weight 11 us through addmm vs 27 us through oneDNN (per-call overhead); a 256x768
# one 59 vs 48 us; pycode's 256x4096 head 500 vs 150 us (addmm reads a wide (in, out) copy poorly).
ONEDNN_MIN_ELEMENTS = 128 * 1024


class PackedLinear:
    """``x @ W.T + b`` as ``addmm(b, x, W_t)`` with ``W_t`` a contiguous ``(in, out)`` copy."""

    __slots__ = ("weight_t", "bias")

    def __init__(self, linear: nn.Linear):
        self.weight_t = linear.weight.detach().t().contiguous()  # (in, out)
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


class OneDNNLinear:
    """``x @ W.T + b`` through oneDNN with the weight reordered once into its blocked layout."""

    __slots__ = ("weight", "bias")

    def __init__(self, linear: nn.Linear, rows_hint: int):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _onednn_works(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear is a private PyTorch op: use it only where it runs and agrees."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        lin = nn.Linear(8, 4).to(dtype)
        x = torch.randn(3, 8, dtype=dtype)
        with torch.inference_mode():
            return torch.allclose(OneDNNLinear(lin, 3)(x), F.linear(x, lin.weight, lin.bias), atol=1e-2)
    except (RuntimeError, AttributeError):
        return False


class DecodeWeights:
    """The callables a step uses: per block ``(ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj)`` and the
    head, one set for one-row steps and one for steps of several rows."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, max_rows: int, enabled: bool = True):
        modules = model.decode_layers()
        linear = (1, 2, 4, 5)  # positions of the Linears in a block's tuple
        self.one_row = modules
        self.head_one_row = model.lm_head
        self.many_rows = modules
        self.head_many_rows = model.lm_head
        if not enabled or device.type != "cpu":
            return
        plain = lambda m: type(m) is nn.Linear  # noqa: E731
        if plain(model.lm_head):
            self.head_one_row = PackedLinear(model.lm_head)
        block_bytes = sum(m.weight.numel() * m.weight.element_size() for b in modules for i, m in enumerate(b)
                          if i in linear and plain(m))
        if block_bytes <= SMALL_MODEL_BYTES:
            # Small weights: per-call overhead dominates and addmm's is the lowest (oneDNN's is higher:
            # 0.59 vs 0.44 ms per 8-row step at the tiny shape).
            self.one_row = [tuple(PackedLinear(m) if i in linear and plain(m) else m for i, m in enumerate(block))
                            for block in modules]
            self.many_rows, self.head_many_rows = self.one_row, self.head_one_row
        if max_rows > 1:
            onednn = _onednn_works(device, dtype)

            def make(m, one_row):  # one_row: this Linear's one-row callable, reused when it is a copy
                if not plain(m):
                    return m
                if onednn and m.weight.numel() >= ONEDNN_MIN_ELEMENTS:
                    return OneDNNLinear(m, max_rows)
                return one_row if isinstance(one_row, PackedLinear) else PackedLinear(m)

            many_rows = [tuple(make(m, fast) if i in linear else m for i, (m, fast) in enumerate(zip(block, ours)))
                         for block, ours in zip(modules, self.one_row)]
            # One set when no block weight changed layout: a LoRA bank then wraps it once (wrap_blocks).
            same = all(a is b for new, old in zip(many_rows, self.one_row) for a, b in zip(new, old))
            self.many_rows = self.one_row if same else many_rows
            self.head_many_rows = make(model.lm_head, self.head_one_row)

    def wrap_blocks(self, wrap) -> None:
        """Replace each set of block callables by ``wrap(set)`` (a LoRA bank adding its updates:
        :meth:`lmcore.lora.LoRABank.wrap`); a set shared by both row counts stays shared. The head
        is left alone (adapters never touch it)."""
        shared = self.many_rows is self.one_row
        self.one_row = wrap(self.one_row)
        self.many_rows = self.one_row if shared else wrap(self.many_rows)

    def layers(self, rows: int) -> list[tuple]:
        return self.one_row if rows == 1 else self.many_rows

    def head(self, rows: int):
        return self.head_one_row if rows == 1 else self.head_many_rows
