"""lmcore.lora: LoRALinear, merge equivalence, adapter save/load sharing the base, LoRA training."""

from __future__ import annotations

import json

import pytest
import torch

from lmcore.lora.adapter import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter_model,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    resolve_targets,
    save_adapter,
)
from lmcore.model import GPT, GPTConfig, load_model, save_pretrained
from lmcore.training import TokenBlocks, TrainConfig, Trainer
from lmcore.training.trainer import latest_checkpoint

CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32)
ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def randomize_adapter(model: GPT, seed: int = 3) -> None:
    """B starts at zero (the adapter is a no-op); give it values so merging has something to merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_targets_resolve_aliases_and_reject_unknown():
    assert resolve_targets(["c_attn"]) == ("attn.c_attn",)
    assert resolve_targets(["c_proj"]) == ("attn.c_proj", "mlp.c_proj")
    assert resolve_targets(["mlp.c_fc", "attn.c_attn"]) == ("attn.c_attn", "mlp.c_fc")
    with pytest.raises(ValueError, match="unknown LoRA target module 'q_proj'"):
        LoRAConfig(target_modules=("q_proj",))
    with pytest.raises(ValueError, match="lora_rank"):
        LoRAConfig(rank=0)


def test_fresh_adapter_is_a_no_op_and_only_adapter_trains():
    base = make_model()
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    expected = base(idx)
    model = apply_lora(make_model(), LoRAConfig(rank=4, alpha=8, target_modules=ALL))
    assert torch.equal(model(idx), expected)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * 4 * CFG.n_layer
    assert isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear)


def test_merge_equals_unmerged_adapter():
    model = apply_lora(make_model(), LoRAConfig(rank=4, alpha=16, target_modules=ALL))
    randomize_adapter(model)
    idx = torch.randint(0, CFG.vocab_size, (3, 16))
    with torch.no_grad():
        unmerged = model(idx)
        assert not torch.allclose(unmerged, make_model()(idx), atol=1e-3)  # the adapter does something
        merged_model = merge_lora(model)
        merged = merged_model(idx)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_adapter_roundtrip_shares_base_weights(tmp_path):
    base_dir = tmp_path / "base"
    save_pretrained(make_model(), base_dir)
    model = apply_lora(make_model(), LoRAConfig(rank=2, alpha=4, target_modules=("c_attn", "c_fc")))
    randomize_adapter(model)
    idx = torch.randint(0, CFG.vocab_size, (2, 10))
    with torch.no_grad():
        expected = model(idx)
    save_adapter(model, tmp_path / "adapter", base_model="base")
    meta = read_adapter_config(tmp_path / "adapter")
    assert meta["base_model"] == "base" and meta["r"] == 2 and meta["target_modules"] == ["attn.c_attn", "mlp.c_fc"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]

    base = load_model(base_dir)
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    served = load_adapter_model(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(served(idx), expected)
        # The base is shared, not copied, and not modified.
        assert served.transformer.wte.weight.data_ptr() == base.transformer.wte.weight.data_ptr()
        assert served.transformer.h[0].attn.c_attn.base.weight.data_ptr() == \
            base.transformer.h[0].attn.c_attn.weight.data_ptr()
        for k, v in base.state_dict().items():
            assert torch.equal(v, base_before[k])
        # By name: the adapter's base_model is resolved next to the adapter directory.
        by_name = load_adapter_model(None, tmp_path / "adapter", merge=True)
        torch.testing.assert_close(by_name(idx), expected, rtol=1e-4, atol=1e-5)


def test_adapter_with_wrong_shapes_is_rejected(tmp_path):
    model = apply_lora(make_model(), LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "adapter", base_model="base")
    other = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=64))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_model(other, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    del cfg["base_model"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="base_model"):
        load_adapter_model(make_model(), tmp_path / "adapter")


def test_lora_training_lowers_loss_and_resumes_bit_exact(tmp_path):
    tokens = (torch.arange(3000) % 11 + 2)
    data = TokenBlocks(tokens, CFG.block_size)

    def run(ckpt, stop_after=None):
        model = apply_lora(make_model(), LoRAConfig(rank=4, alpha=8, dropout=0.1, target_modules=ALL))
        steps = []
        cfg = TrainConfig(max_steps=16, batch_size=4, learning_rate=3e-2, checkpoint_interval=3, seed=2, log_interval=1)
        trainer = Trainer(model, cfg, data, checkpoint_dir=ckpt, callback=steps.append,
                          should_stop=lambda: stop_after is not None
                          and sum(e.kind == "step" for e in steps) >= stop_after)
        return model, trainer.train()

    full, result = run(tmp_path / "a")
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.3
    run(tmp_path / "b", stop_after=5)
    assert latest_checkpoint(tmp_path / "b").name == "step-000003"
    resumed, r2 = run(tmp_path / "b")
    assert r2.resumed_from is not None
    for name, t in lora_state_dict(full).items():
        assert torch.equal(t, lora_state_dict(resumed)[name]), name
    # The checkpoint holds only the adapter, not the base weights.
    from safetensors.torch import load_file
    saved = load_file(str(latest_checkpoint(tmp_path / "b") / "trainable.safetensors"))
    assert set(saved) == set(lora_state_dict(full))


def test_adapter_bank_serves_different_adapters_in_one_batch(tmp_path):
    """S-LoRA style: rows of one batch use different adapters (or none) and match each model alone."""
    from lmcore.lora import LoRABank

    dirs = []
    for i, (targets, rank) in enumerate([(("c_attn",), 2), (ALL, 4)]):
        m = apply_lora(make_model(), LoRAConfig(rank=rank, alpha=2.0 * rank + i, target_modules=targets))
        randomize_adapter(m, seed=10 + i)
        save_adapter(m, tmp_path / f"a{i}", base_model="base")
        dirs.append(tmp_path / f"a{i}")
    base = make_model()
    idx = torch.randint(0, CFG.vocab_size, (3, 12))
    with torch.no_grad():
        alone = [load_adapter_model(base, d)(idx) for d in dirs] + [base(idx)]
        model = make_model()
        bank = LoRABank(model)
        first, second = bank.add("one", dirs[0]), bank.add("two", dirs[1])
        assert (first, second) == (0, 1) and bank.add("one", dirs[0]) == 0
        assert bank.adapters() == ["one", "two"] and not hasattr(model, "adapter_names")
        bank.route(torch.tensor([[second], [-1], [first]]))  # (B, 1): one adapter per row
        mixed = model(idx)
        torch.testing.assert_close(mixed[0], alone[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], alone[2][1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[2], alone[0][2], rtol=1e-5, atol=1e-5)
        bank.route(None)
        assert torch.equal(model(idx), base(idx))
        bank.remove("one")
        assert bank.adapters() == ["two"] and bank.add("three", dirs[0]) == 2  # indices are never reused
        bank.remove("three")
        bank.route(torch.tensor([[first], [second], [second]]))
        after = model(idx)
        torch.testing.assert_close(after[0], alone[2][0], rtol=1e-5, atol=1e-5)  # removed: the base alone
        torch.testing.assert_close(after[1:], alone[1][1:], rtol=1e-5, atol=1e-5)
        with bank.use("two"):  # a plain forward through one adapter, this thread only
            torch.testing.assert_close(model(idx), alone[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(idx)[1:], alone[1][1:], rtol=1e-5, atol=1e-5)  # routing restored
    with pytest.raises(ValueError, match="unknown adapter 'one'.*two"):
        bank.index("one")
    with pytest.raises(ValueError, match="already in a LoRA bank"):
        LoRABank(model)
