"""lmcore.model.inspection against transformers' GPT-2 (``output_attentions=True``, eager attention).

On random checkpoints of several shapes, through real files on disk: every layer's and head's
attention equals transformers' (atol 1e-5), the top-k probabilities equal softmax of its logits
(atol 1e-5), the actual next token's probability and rank agree with those logits, and the logit
lens equals its hidden states through ``ln_f`` and the tied head. Then the shape rules (causal,
rows summing to 1, the selection is a slice of the whole), bad selections, token pieces and byte
offsets, and adapters: a LoRA adapter's attention differs from its base's, and the bank path a
server uses (``Engine.use_adapter``) equals the adapter loaded as its own model; a merged
fine-tune matches transformers on its merged weights.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.testing import assert_close

from lmcore.model.inspection import (
    MAX_TOP_K,
    attention_bytes,
    inspect_tokens,
    show_bytes,
    token_pieces,
)
from tests.helpers.models import SHAPES, random_model, random_prompts

ATOL = 1e-5  # float32 on both sides; measured: attention <= 2.2e-7, probabilities <= 1.7e-6


def hf_twin(model, path) -> transformers.GPT2LMHeadModel:
    model.save_pretrained(path)
    return transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()


def hf_reference(hf, ids: list[int]):
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    return out


def check_against_transformers(ins, hf, ids: list[int], top_k: int) -> None:
    ref = hf_reference(hf, ids)
    T = len(ids)
    assert len(ref.attentions) == len(ins.layers)
    for layer in ins.layers:
        assert_close(ins.attention[layer], ref.attentions[layer][0], atol=ATOL, rtol=0)
    probs = ref.logits[0].float().softmax(-1)  # (T, V)
    ref_top = probs.topk(top_k, dim=-1)
    assert_close(ins.top_probs, ref_top.values, atol=ATOL, rtol=0)
    # ids agree except where two probabilities tie within rounding (checked by value above)
    gathered = probs.gather(1, ins.top_ids)
    assert_close(gathered, ref_top.values, atol=ATOL, rtol=0)
    nxt = torch.tensor(ids[1:])
    ref_next = probs[:-1].gather(1, nxt[:, None]).squeeze(1)
    assert_close(ins.next_probs, ref_next, atol=ATOL, rtol=0)
    ref_rank = (probs[:-1] > ref_next[:, None] + ATOL).sum(-1) + 1  # rank up to near-ties
    assert ((ins.next_ranks - ref_rank).abs() <= (probs[:-1] - ref_next[:, None]).abs().lt(ATOL).sum(-1)).all()
    # the lens: hidden_states[l] (l < n_layer) through ln_f and the tied head; the last one is ln_f'd already
    hs = ref.hidden_states
    lens_logits = [hf.lm_head(hf.transformer.ln_f(h)) for h in hs[:-1]] + [hf.lm_head(hs[-1])]
    lens = torch.stack([lg[0].float().softmax(-1).max(-1).values for lg in lens_logits])  # (L+1, T)
    with torch.no_grad():
        assert_close(ins.lens_probs, lens, atol=ATOL, rtol=0)
    assert ins.lens_ids.shape == (hf.config.n_layer + 1, T)
    assert (ins.lens_ids[-1] == ins.top_ids[:, 0]).all()  # the last lens row is the real prediction


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_transformers_output_attentions(tmp_path, shape):
    model = random_model(seed=3, **SHAPES[shape])
    hf = hf_twin(model, tmp_path)
    for ids in random_prompts(model.config.vocab_size, [1, 7, model.config.block_size], seed=5):
        ins = inspect_tokens(model, ids, top_k=5)
        assert ins.layers == list(range(model.config.n_layer))
        assert ins.heads == list(range(model.config.n_head))
        check_against_transformers(ins, hf, ids, top_k=5)


def test_attention_is_causal_normalised_and_the_selection_is_a_slice():
    model = random_model(seed=1, **SHAPES["narrow-heads"])
    ids = random_prompts(model.config.vocab_size, [40], seed=2)[0]
    full = inspect_tokens(model, ids, top_k=3)
    T = len(ids)
    for layer, att in full.attention.items():
        assert att.shape == (model.config.n_head, T, T)
        assert (att.triu(1) == 0).all(), f"layer {layer} attends to the future"
        assert_close(att.sum(-1), torch.ones(model.config.n_head, T), atol=1e-5, rtol=0)
        assert (att >= 0).all()
        assert_close(att[:, 0, 0], torch.ones(model.config.n_head))  # token 0 can only see itself
    part = inspect_tokens(model, ids, top_k=3, layers=[2, 0], heads=[5, 1])
    assert part.layers == [2, 0] and part.heads == [5, 1]
    assert sorted(part.attention) == [0, 2]
    for layer in (0, 2):
        assert_close(part.attention[layer], full.attention[layer][[5, 1]])
    assert_close(part.top_probs, full.top_probs)
    none = inspect_tokens(model, ids, top_k=3, attention=False, logit_lens=False)
    assert none.attention == {} and none.layers == [] and none.lens_ids is None
    assert_close(none.next_probs, full.next_probs)
    # ranks: rank 1 exactly where the next token is the top choice
    assert ((full.next_ranks == 1) == (full.top_ids[:-1, 0] == torch.tensor(ids[1:]))).all()
    assert_close(full.surprise_bits, -torch.log2(full.next_probs))
    assert attention_bytes(T, 3, 6) == 3 * 6 * T * T * 2


@pytest.mark.parametrize("kw, message", [
    (dict(layers=[3]), "layer 3 does not exist: this model has 3 layers, numbered 0..2"),
    (dict(layers=[-1]), "layer -1 does not exist"),
    (dict(heads=[6]), "head 6 does not exist: this model has 6 heads, numbered 0..5"),
    (dict(heads=[1, 1]), "name a head twice"),
    (dict(top_k=0), f"top_k must be between 1 and {MAX_TOP_K}, got 0"),
    (dict(top_k=MAX_TOP_K + 1), f"top_k must be between 1 and {MAX_TOP_K}"),
])
def test_bad_selections_are_refused(kw, message):
    model = random_model(seed=1, **SHAPES["narrow-heads"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        inspect_tokens(model, [1, 2, 3], **kw)


@pytest.mark.parametrize("ids, message", [
    ([], "nothing to inspect"),
    ([1, 301], "token 301 is outside the vocabulary"),
    ([1] * 97, "97 tokens is longer than the model's context of 96"),
])
def test_bad_tokens_are_refused(ids, message):
    model = random_model(seed=1, **SHAPES["narrow-heads"])
    with pytest.raises(ValueError, match=message):
        inspect_tokens(model, ids)


def test_token_pieces_have_byte_offsets_into_the_text(tokenizer):
    text = "Ünïcödé ✓ text, 日本語 and <|endoftext|>"
    ids = tokenizer.encode(text)
    pieces = token_pieces(tokenizer, ids)
    raw = text.encode()
    assert [p.id for p in pieces] == ids
    assert b"".join(p.piece for p in pieces) == raw
    for p in pieces:
        assert raw[p.start:p.end] == p.piece
    assert pieces[0].start == 0 and pieces[-1].end == len(raw)
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    # a token holding part of a character shows its bytes, never a replacement character
    partial = [p for p in pieces if "\\x" in p.text]
    assert partial, "the GPT-2 vocabulary splits 日本語 inside characters"
    assert all("\ufffd" not in p.text for p in pieces)
    assert show_bytes("✓".encode()[:2]) == "\\xe2\\x9c"
    assert token_pieces(tokenizer, [tokenizer.eos_id])[0].text == "<|endoftext|>"


def _adapter(tmp_path, base, seed: int):
    from lmcore.lora import LoRAConfig, apply_lora, load_adapter_model
    from lmcore.lora.adapter import lora_state_dict, save_adapter
    from lmcore.model import load_model

    base.save_pretrained(tmp_path / "base")
    trained = apply_lora(load_model(tmp_path / "base"), LoRAConfig(rank=4, alpha=8.0, target_modules=("attn.c_attn",
                                                                                                     "mlp.c_fc")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(trained).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(trained, tmp_path / "adapter", base_model="base")
    return tmp_path / "adapter", load_adapter_model(base, tmp_path / "adapter")


def test_an_adapter_changes_attention_and_the_bank_path_equals_it(tmp_path):
    from lmcore import Engine
    from lmcore.lora import load_adapter_model

    base = random_model(seed=4, **SHAPES["tiny"])
    adapter_dir, adapted = _adapter(tmp_path, base, seed=9)
    ids = random_prompts(base.config.vocab_size, [24], seed=1)[0]
    plain = inspect_tokens(base, ids)
    own = inspect_tokens(adapted, ids)
    for layer in plain.layers:  # c_attn's adapter moves queries and keys: every layer's weights move
        assert (plain.attention[layer] - own.attention[layer]).abs().max() > 1e-3
    # the server's path: the adapter in the engine's bank, this thread routed through it
    from lmcore.model import load_model

    engine = Engine(load_model(tmp_path / "base"), max_batch_size=2)  # the bank wraps its model in place
    engine.add_adapter("ft", adapter_dir)
    with engine.use_adapter("ft"):
        banked = inspect_tokens(engine.model, ids)
    with engine.use_adapter(None):
        banked_base = inspect_tokens(engine.model, ids)
    for layer in plain.layers:
        assert_close(banked.attention[layer], own.attention[layer], atol=1e-5, rtol=0)
        assert_close(banked_base.attention[layer], plain.attention[layer], atol=1e-5, rtol=0)
    assert_close(banked.top_probs, own.top_probs, atol=1e-5, rtol=0)
    # a merged fine-tune is a full model: transformers reads its checkpoint and agrees
    merged = load_adapter_model(base, adapter_dir, merge=True)
    hf = hf_twin(merged, tmp_path / "merged")
    ins = inspect_tokens(merged, ids, top_k=4)
    check_against_transformers(ins, hf, ids, top_k=4)
    for layer in plain.layers:  # merging re-rounds the weights: ~3e-5 apart with this large adapter
        assert_close(ins.attention[layer], own.attention[layer], atol=1e-4, rtol=0)


def test_an_int8_model_is_inspected_through_its_own_modules(tmp_path):
    """``load_model(quantize="int8")`` swaps the Linears for int8 ones: the inspection runs them,
    so its probabilities are that model's own (softmax of its forward) and its attention is normalised."""
    from lmcore.model import load_model

    random_model(seed=2, **SHAPES["tiny"]).save_pretrained(tmp_path)
    q = load_model(tmp_path, quantize="int8")
    ids = random_prompts(q.config.vocab_size, [20], seed=3)[0]
    ins = inspect_tokens(q, ids, top_k=4)
    with torch.no_grad():
        probs = q(torch.tensor([ids]))[0].float().softmax(-1)
    assert_close(ins.top_probs, probs.topk(4, dim=-1).values, atol=1e-5, rtol=0)
    for att in ins.attention.values():
        assert_close(att.sum(-1), torch.ones(att.shape[:2]), atol=1e-5, rtol=0)
        assert (att.triu(1) == 0).all()
