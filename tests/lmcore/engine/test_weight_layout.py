"""The decode weight layouts: re-laid-out copies compute what the modules compute.

:mod:`lmcore.engine.weight_layout` keeps copies of the Linear weights in layouts that read faster
(contiguous ``(in, out)``, oneDNN's blocked layout). Speed is the bench's business; here each copy
must equal ``F.linear`` on the original weights, and :class:`DecodeWeights` must pick the copies
it documents (small models: one set of PackedLinear for every step; larger ones: the modules for
one row, oneDNN or PackedLinear for several) and give the same logits as the plain modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmcore import SamplingParams, generate
from lmcore.engine import weight_layout
from lmcore.engine.weight_layout import DecodeWeights, OneDNNLinear, PackedLinear, _onednn_works
from tests.helpers.models import greedy_without_cache, random_model, random_prompts

CPU = torch.device("cpu")
LINEARS = (1, 2, 4, 5)  # positions of the Linears in a block's (ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj)
needs_onednn = pytest.mark.skipif(not _onednn_works(CPU, torch.float32), reason="oneDNN prepacked linear unavailable")


def _linear(n_in, n_out, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_packed_linear_equals_f_linear(bias, rows):
    lin = _linear(48, 80, bias)
    x = torch.randn(rows, 48)
    packed = PackedLinear(lin)
    assert packed.weight_t.shape == (48, 80) and packed.weight_t.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 8])
def test_onednn_linear_equals_f_linear(bias, rows):
    lin = _linear(64, 96, bias, seed=1)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        torch.testing.assert_close(OneDNNLinear(lin, 8)(x), F.linear(x, lin.weight, lin.bias), rtol=1e-4, atol=1e-4)


def _assert_same_outputs(model, weights: DecodeWeights, rows: int):
    """Every block callable and the head for ``rows`` rows against the model's own modules."""
    torch.manual_seed(rows)
    with torch.inference_mode():
        for fast, plain in zip(weights.layers(rows), model.decode_layers()):
            for i in LINEARS:
                x = torch.randn(rows, plain[i].in_features)
                torch.testing.assert_close(fast[i](x), plain[i](x), rtol=1e-4, atol=1e-4)
        h = torch.randn(rows, model.config.n_embd)
        torch.testing.assert_close(weights.head(rows)(h), model.lm_head(h), rtol=1e-4, atol=1e-4)


def test_small_model_uses_one_set_of_packed_copies():
    model = random_model(40)
    w = DecodeWeights(model, CPU, torch.float32, max_rows=8)
    assert w.many_rows is w.one_row and w.head_many_rows is w.head_one_row
    assert all(isinstance(block[i], PackedLinear) for block in w.one_row for i in LINEARS)
    assert isinstance(w.head_one_row, PackedLinear)
    assert [block[0] for block in w.one_row] == [b.ln_1 for b in model.transformer.h]  # norms stay modules
    for rows in (1, 4):
        _assert_same_outputs(model, w, rows)


def test_larger_model_keeps_modules_for_one_row_and_prepacks_for_several(monkeypatch):
    monkeypatch.setattr(weight_layout, "SMALL_MODEL_BYTES", 0)  # the tiny model takes the large-model path
    monkeypatch.setattr(weight_layout, "ONEDNN_MIN_ELEMENTS", 0)  # and its small weights count as large
    model = random_model(41)
    w = DecodeWeights(model, CPU, torch.float32, max_rows=8)
    assert w.one_row == model.decode_layers()  # one row: the modules themselves ...
    assert isinstance(w.head_one_row, PackedLinear)  # ... and a contiguous (in, out) head
    fast = OneDNNLinear if _onednn_works(CPU, torch.float32) else PackedLinear
    assert all(isinstance(block[i], fast) for block in w.many_rows for i in LINEARS)
    assert isinstance(w.head_many_rows, fast)
    for rows in (1, 3, 8):
        _assert_same_outputs(model, w, rows)
    # and end to end: an engine on those layouts decodes what the plain forward does
    prompts = random_prompts(model.config.vocab_size, [5, 9, 3], seed=41)
    out = generate(model, prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert [c.token_ids for c in out] == [greedy_without_cache(model, p, 6) for p in prompts]


def test_small_model_prepacks_only_its_large_weights_for_several_rows(monkeypatch):
    """A small model's steps of several rows use oneDNN for weights of ONEDNN_MIN_ELEMENTS or more
    (pycode's head) and keep the one-row copies for the rest (one shared block set if none changed)."""
    model = random_model(44)
    head = model.lm_head.weight.numel()
    monkeypatch.setattr(weight_layout, "ONEDNN_MIN_ELEMENTS", head)  # the head qualifies, no block weight does
    w = DecodeWeights(model, CPU, torch.float32, max_rows=8)
    fast = OneDNNLinear if _onednn_works(CPU, torch.float32) else PackedLinear
    assert isinstance(w.head_many_rows, fast) and isinstance(w.head_one_row, PackedLinear)
    assert w.many_rows is w.one_row  # no block weight changed layout: one set
    for rows in (1, 5):
        _assert_same_outputs(model, w, rows)
    big = model.transformer.h[0].mlp.c_fc.weight.numel()
    monkeypatch.setattr(weight_layout, "ONEDNN_MIN_ELEMENTS", big)  # now the MLP's weights (and the head) too
    w = DecodeWeights(model, CPU, torch.float32, max_rows=8)
    assert w.many_rows is not w.one_row
    assert all(isinstance(block[i], fast) for block in w.many_rows for i in (4, 5))
    assert all(block[1] is one[1] for block, one in zip(w.many_rows, w.one_row))  # attention's copies shared
    for rows in (1, 5):
        _assert_same_outputs(model, w, rows)


def test_disabled_or_wrapped_modules_are_used_as_they_are():
    model = random_model(42)
    w = DecodeWeights(model, CPU, torch.float32, max_rows=8, enabled=False)
    assert w.one_row == w.many_rows == model.decode_layers() and w.head(1) is w.head(8) is model.lm_head
    from lmcore.lora import LoRAConfig, apply_lora

    apply_lora(model, LoRAConfig(rank=2, target_modules=("attn.c_attn",)))
    w = DecodeWeights(model, CPU, torch.float32, max_rows=8)
    assert all(block[1] is b.attn.c_attn for block, b in zip(w.one_row, model.transformer.h))  # a LoRA wrapper
    assert all(isinstance(block[2], PackedLinear) for block in w.one_row)  # plain Linears still copied
    _assert_same_outputs(model, w, 2)


def test_wrap_blocks_keeps_a_shared_set_shared():
    model = random_model(43)
    w = DecodeWeights(model, CPU, torch.float32, max_rows=8)
    calls = []
    w.wrap_blocks(lambda layers: calls.append(layers) or [tuple(b) for b in layers])
    assert len(calls) == 1 and w.many_rows is w.one_row
