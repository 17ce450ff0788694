"""int8 weights for the CPU: a quarter of the bytes per decoded token, through fbgemm's int8 GEMM.

Batch-1 decode reads every weight once per token, so at fp32 it runs at memory speed: GPT-2 small
streams ~500 MB per token. Storing the Linear weights as int8 reads 4x fewer bytes, and the int8
GEMM does the arithmetic on those bytes directly (no fp32 copy is ever made).

**The scheme** (what ``load_model(path, quantize="int8")`` does, :func:`quantize_int8`):

* *Weights*: symmetric int8 **per output channel**: row ``c`` of ``W`` is stored as
  ``round(W[c] / s[c])`` in [-127, 127] with ``s[c] = max|W[c]| / 127``. One scale per row keeps a
  row of small weights from being crushed by another row's large ones.
* *Activations*: quantized on the fly, **per token row**: each row ``x_i`` is divided by its own
  ``max|x_i|``, so every row lies in ``[-1, 1]``, and that range is quantized at one **fixed**
  scale (``1/63`` around zero point 64: codes 1..127) by fbgemm's int8 GEMM with fp32 output
  (``quantized.linear_with_input_q_dq_qweight_dq_output_fp32``); the output row is multiplied
  back by ``max|x_i|``. No scale is computed from the batch, so a row's output is **bit-identical
  alone or in any batch** (tested), a stronger batch invariance than fp32's (whose BLAS blocking
  changes with the row count). 7-bit codes, as fbgemm's own dynamic linear uses on this CPU
  (``reduce_range``): its AVX2 kernel adds pairs of u8 x s8 products in int16, which 8-bit codes
  could saturate.
* *What stays fp32*: biases, LayerNorms, the embeddings (a lookup reads one row per token, not the
  whole matrix) and everything between the GEMMs. The tied output head gets its own int8 copy of
  ``wte`` (it is the largest single GEMM of a step: 50257 x 768 for GPT-2).

**Which kernel** (``bench/generate.py`` and the closing note of issue 15 have the numbers; one
torch thread on this AVX2 CPU, no AVX-512/AMX): fbgemm's int8 linear took 1.3 ms for the
768 x 50257 head at one row vs 5.6 ms for fp32 ``addmm`` and 27 ms for ``torch._weight_int8pack_mm``
(weight-only int8, which has no fast kernel without AVX-512); ``torch._int_mm`` (int8 x int8) took
4.2 ms. fbgemm won at every shape measured, so it is the kernel; nothing here is hand-written C++.

**Per-call overhead** (profiled: ``torch.profiler`` over batch-1 GPT-2-small decode steps, 49 int8
GEMMs a step). The first version called fbgemm's *dynamic* linear, which picks one scale for the
whole input tensor, so it needed a constant fence row appended to every input (a ``cat``), a slice
to drop its output, and fbgemm's own min/max pass: nine tensor ops around each GEMM, ~4 us each,
more time than the GEMM itself for a 768 x 768 weight. The fixed-scale GEMM needs none of that:
a row maximum (one ``vector_norm``), a division, the GEMM and one ``addcmul``.

Error: logits within a few hundredths of fp32 on GPT-2 shapes (``tests/lmcore/model/test_quantize.py``
states the tolerance), and the shipped ``pycode`` model's held-out perplexity within 1% (the same
test file gates it; ``docs/generation.md`` has the table). int8 is a CPU feature: on CUDA use bf16.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

QUANTIZATIONS = ("int8",)

# Rows scaled into [-1, 1] are quantized at this fixed scale: codes 64 +- 63 (7 bits, see the module).
ACTIVATION_SCALE, ACTIVATION_ZERO_POINT = 1.0 / 63.0, 64
# fbgemm's int8 GEMM for an fp32 input quantized at given parameters, fp32 output (the OpOverload:
# calling it skips the op packet's per-call Python checks of its arguments).
_int8_linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default


class Int8Linear(nn.Module):
    """``x @ W.T + b`` with ``W`` int8 per output channel and ``x`` quantized per row (see the module)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        with warnings.catch_warnings():  # quantized tensor constructors are flagged deprecated, still the API
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0)
        # fbgemm's prepacked weight (an opaque handle, not in the state dict); bias added separately
        # so it is not scaled by the per-row factor.
        self._packed = torch.ops.quantized.linear_prepack(qw, None)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight ``(out, in)`` (made on demand: for code that reads ``.weight``,
        such as a LoRA bank taking its dtype and device; the forward never builds it)."""
        return self.weight_int8.float() * self.weight_scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (N, in); the decode step's is 2-D already
        s = torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30)  # (N, 1)
        y = _int8_linear(x2 / s, ACTIVATION_SCALE, ACTIVATION_ZERO_POINT, self._packed)  # (N, out)
        y = torch.addcmul(self.bias, y, s, out=y) if self.bias is not None else y.mul_(s)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1))
        if probe.device.type != "cpu":
            raise ValueError("int8 weights are a CPU feature (fbgemm); on CUDA load the model without "
                             "quantize= and use dtype=torch.bfloat16")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per channel, bias={self.bias is not None}"


def quantize_int8(model):
    """Replace every Linear of a GPT's blocks and its output head by :class:`Int8Linear`, in place.

    The model must be fp32 on the CPU. Returns the model; ``model.quantization`` becomes ``"int8"``.
    """
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"int8 quantization needs an fp32 model on the CPU, got {model.dtype} on "
                         f"{model.device}; on CUDA use dtype=torch.bfloat16 instead")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("int8 quantization needs PyTorch's fbgemm backend, which this build lacks")
    for block in model.transformer.h:
        for parent, attr in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            module = getattr(parent, attr)
            if type(module) is not nn.Linear:
                raise ValueError(f"cannot quantize a {type(module).__name__}: quantize the base model "
                                 "before adding LoRA adapters (a LoRA bank on an int8 base is fine)")
            setattr(parent, attr, Int8Linear(module))
    model.lm_head = Int8Linear(model.lm_head)  # its own int8 copy: wte stays fp32 for the lookup
    model.quantization = "int8"
    return model
