"""lmcore's GPT against Hugging Face transformers' GPT2LMHeadModel, and checkpoint I/O errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from torch.testing import assert_close

from lmcore import GPT, GPTConfig, load_model
from lmcore.model import PRESETS

# Shapes chosen to catch layout bugs: a non-power-of-two head count, a vocab that is not a
# multiple of 64, a small context, more heads than usual per width.
SHAPES = [
    dict(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=3),
    dict(vocab_size=1001, n_positions=16, n_embd=60, n_layer=3, n_head=5),
    dict(vocab_size=257, n_positions=64, n_embd=64, n_layer=1, n_head=8),
]


def hf_model(seed: int, **shape) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save_hf(hf: transformers.GPT2LMHeadModel, path, safe_serialization: bool = True) -> None:
    """Save as transformers does; the legacy ``pytorch_model.bin`` format (which transformers 5 no
    longer writes) is a ``torch.save`` of the full state dict, tied ``lm_head.weight`` included."""
    if safe_serialization:
        hf.save_pretrained(path)
    else:
        hf.config.save_pretrained(path)
        torch.save(hf.state_dict(), path / "pytorch_model.bin")


def random_ids(vocab: int, T: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s['vocab_size']}-C{s['n_embd']}-H{s['n_head']}")
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_hf_checkpoint_loads_with_logit_parity(tmp_path, shape, safe_serialization):
    hf = hf_model(seed=1, **shape)
    save_hf(hf, tmp_path, safe_serialization)
    expected_file = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    assert (tmp_path / expected_file).is_file()

    model = load_model(tmp_path)
    assert model.tokenizer is None  # no tokenizer files: still loads
    idx = random_ids(shape["vocab_size"], shape["n_positions"])
    with torch.no_grad():
        assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["V300", "V1001"])
def test_lmcore_checkpoint_loads_in_transformers(tmp_path, shape):
    config = GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["n_positions"],
                       n_embd=shape["n_embd"], n_layer=shape["n_layer"], n_head=shape["n_head"])
    torch.manual_seed(2)
    model = GPT(config).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = random_ids(config.vocab_size, config.block_size, seed=3)
    with torch.no_grad():
        assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)
    # and back into lmcore, bit for bit
    again = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


def test_bias_free_variant_round_trips_through_transformers(tmp_path):
    """bias=False saves zero biases (transformers' GPT-2 always has them) and loads back bias-free."""
    config = GPTConfig.from_preset("tiny", bias=False)
    torch.manual_seed(4)
    model = GPT(config).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = random_ids(config.vocab_size, 40)
    with torch.no_grad():
        assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)
    again = load_model(tmp_path)
    assert again.config.bias is False
    assert all(not n.endswith(".bias") for n, _ in again.named_parameters())


def test_weight_tying_is_one_tensor(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    # counting the shared matrix once: embeddings + 12*C^2+13*C per block (with biases) + final LN
    c = loaded.config
    per_block = 12 * c.n_embd**2 + 13 * c.n_embd
    expected = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    assert loaded.num_parameters() == expected


def test_presets_match_gpt2_sizes():
    # GPT-2 small has 124,439,808 parameters (tied head counted once); check without allocating.
    c = GPTConfig.from_preset("gpt2")
    per_block = 12 * c.n_embd**2 + 13 * c.n_embd
    total = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    assert total == 124_439_808
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"} <= set(PRESETS)
    assert GPTConfig.from_preset("gpt2-xl").n_head == 25


def test_forward_rejects_sequences_past_the_context():
    model = GPT(GPTConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="129 tokens.*context of 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_bf16_load_stays_close_to_fp32(tmp_path):
    """bf16 keeps 8 mantissa bits: logits of a random tiny model stay within 0.05 of fp32's.

    Random-init logits are ~N(0, 0.3); bf16 rounding of weights and activations moves them by a
    few 1e-3 on average. Tolerance: max abs error 0.05 and mean abs error under 0.01.
    """
    hf = hf_model(seed=5, **SHAPES[0])
    hf.save_pretrained(tmp_path)
    fp32 = load_model(tmp_path)
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    idx = random_ids(300, 32)
    with torch.no_grad():
        ref, low = fp32(idx), bf16(idx).float()
    err = (ref - low).abs()
    assert err.max().item() < 0.05, err.max()
    assert err.mean().item() < 0.01, err.mean()


def test_checkpoint_dtype_is_kept_when_dtype_is_none(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny")).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert load_model(tmp_path).dtype == torch.bfloat16
    assert load_model(tmp_path, dtype=torch.float32).dtype == torch.float32


# --- bad checkpoints: each gives a clear ValueError naming the file and the problem ---------------


@pytest.fixture
def good_dir(tmp_path):
    d = tmp_path / "model"
    hf_model(seed=6, **SHAPES[0]).save_pretrained(d)
    return d


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(ValueError, match=r"missing config\.json"):
        load_model(good_dir)


def test_wrong_model_type(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'llama'"):
        load_model(good_dir)


def test_missing_weights(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights found"):
        load_model(good_dir)


def _rewrite_tensors(d, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(good_dir):
    _rewrite_tensors(good_dir, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor.*h\.1\.mlp\.c_fc\.weight"):
        load_model(good_dir)


def test_unexpected_tensor(good_dir):
    def add(t):
        t["transformer.h.7.ln_1.weight"] = torch.ones(48)

    _rewrite_tensors(good_dir, add)
    with pytest.raises(ValueError, match=r"unexpected tensor.*h\.7\.ln_1\.weight"):
        load_model(good_dir)


def test_shape_mismatch(good_dir):
    def shrink(t):
        t["transformer.h.0.attn.c_attn.weight"] = torch.zeros(48, 100)

    _rewrite_tensors(good_dir, shrink)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight.*\(48, 100\).*\(48, 144\)"):
        load_model(good_dir)


def test_config_disagreeing_with_weights(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["n_embd"] = 96
    cfg["n_head"] = 4
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        load_model(good_dir)


def test_truncated_safetensors(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(good_dir)


def test_truncated_bin(tmp_path):
    save_hf(hf_model(seed=7, **SHAPES[0]), tmp_path, safe_serialization=False)
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: cannot read PyTorch checkpoint"):
        load_model(tmp_path)


def test_invalid_config_json(good_dir):
    (good_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(good_dir)


def test_untied_head_is_rejected(good_dir):
    def untie(t):
        t["lm_head.weight"] = torch.randn_like(t["transformer.wte.weight"])

    _rewrite_tensors(good_dir, untie)
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        load_model(good_dir)


def test_legacy_mask_buffers_are_ignored(good_dir):
    """Old transformers versions saved the causal mask as attn.bias / attn.masked_bias."""

    def add_buffers(t):
        for i in range(2):
            t[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
            t[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)

    _rewrite_tensors(good_dir, add_buffers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(good_dir)
    assert model.config.n_layer == 2


def test_bad_config_values():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=50, n_head=3)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("gpt5")
