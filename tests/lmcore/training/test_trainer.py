"""lmcore.training.trainer: schedule, parameter groups, accumulation, evaluation, and bit-exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from lmcore.model import GPT, GPTConfig
from lmcore.training import TokenBlocks
from lmcore.training.data import BatchSampler, train_eval_split
from lmcore.training.trainer import (
    TrainConfig,
    Trainer,
    latest_checkpoint,
    list_checkpoints,
    lr_at,
    param_groups,
)

CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def make_model(seed: int = 0, config: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def pattern_tokens(n: int = 2000, seed: int = 1) -> torch.Tensor:
    """A learnable stream: a repeating sequence with occasional random tokens."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 13 + 3
    noise = torch.randint(0, CFG.vocab_size, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.9
    return torch.where(keep, base, noise)


def state(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(max_steps=100, learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    mid = lr_at(55, cfg, 100)  # halfway through the decay: the mean of peak and floor
    assert mid == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)


def test_weight_decay_on_matrices_only():
    model = make_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # The tied embedding/head is one tensor: it must appear once.
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_train_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_sampler_is_seeded_covers_each_epoch_and_resumes():
    s = BatchSampler(10, 3, seed=7)
    epoch0 = [s.next_indices() for _ in range(4)]
    assert sorted(i for b in epoch0 for i in b) == list(range(10)) and len(epoch0[-1]) == 1
    saved = s.state_dict()
    after = [s.next_indices() for _ in range(3)]
    t = BatchSampler(10, 3, seed=7)
    t.load_state_dict(saved)
    assert [t.next_indices() for _ in range(3)] == after
    assert BatchSampler(10, 3, seed=8).next_indices() != BatchSampler(10, 3, seed=7).next_indices()


def test_training_lowers_loss_and_reports_events():
    data = TokenBlocks(pattern_tokens(), CFG.block_size)
    train, held_out = train_eval_split(data, 0.1, seed=0)
    model = make_model()
    events = []
    cfg = TrainConfig(max_steps=40, batch_size=8, learning_rate=3e-3, eval_interval=20, warmup_steps=4)
    trainer = Trainer(model, cfg, train, held_out, callback=events.append)
    before = trainer.evaluate()
    result = trainer.train()
    assert result.steps == 40 and not result.stopped
    assert result.eval_loss < before - 1.0, (before, result.eval_loss)
    kinds = [e.kind for e in events]
    assert kinds.count("step") == 40 and kinds.count("eval") == 2 and kinds[0] == "start" and kinds[-1] == "done"
    assert (events[0].step, events[0].total_steps) == (0, 40)
    assert events[0].parameters == model.num_parameters()  # everything trains; the tied head counted once
    step = next(e for e in events if e.kind == "step")
    assert step.tokens_per_s > 0 and step.lr > 0 and step.trained_tokens == 8 * CFG.block_size


def test_grad_accumulation_matches_one_big_batch():
    data = TokenBlocks(pattern_tokens(), CFG.block_size)
    cfg_nodrop = GPTConfig(**{**CFG.to_dict(), "dropout": 0.0})
    a, b = make_model(0, cfg_nodrop), make_model(0, cfg_nodrop)
    Trainer(a, TrainConfig(max_steps=3, batch_size=8, grad_accum_steps=1), data).train()
    Trainer(b, TrainConfig(max_steps=3, batch_size=4, grad_accum_steps=2), data).train()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


def run(tmp, stop_after: int | None = None, init_seed: int = 0) -> tuple[GPT, Trainer]:
    data = TokenBlocks(pattern_tokens(), CFG.block_size)
    train, held_out = train_eval_split(data, 0.1, seed=0)
    model = make_model(init_seed)
    cfg = TrainConfig(max_steps=9, batch_size=4, grad_accum_steps=2, learning_rate=2e-3, warmup_steps=2,
                      checkpoint_interval=3, eval_interval=4, seed=5, keep_checkpoints=2)
    steps = []
    trainer = Trainer(model, cfg, train, held_out, checkpoint_dir=tmp, callback=lambda e: steps.append(e),
                      should_stop=lambda: stop_after is not None and len([e for e in steps if e.kind == "step"])
                      >= stop_after)
    trainer.train()
    return model, trainer


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    """Stop mid-run (after step 5; the latest checkpoint is step 3), resume in a fresh model and
    trainer (initialised differently, RNG disturbed): the final weights equal an uninterrupted run's."""
    full, _ = run(tmp_path / "full")
    interrupted, t1 = run(tmp_path / "resumed", stop_after=5)
    assert t1.step == 5
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000003"
    torch.manual_seed(1234)
    torch.rand(100)  # a different RNG state than the first process had
    resumed, t2 = run(tmp_path / "resumed", init_seed=99)
    assert t2.resumed_from.endswith("step-000003") and t2.step == 9
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    # Checkpoints rotate: only the newest keep_checkpoints remain, and no temporary directory.
    names = [p.name for p in list_checkpoints(tmp_path / "resumed")]
    assert names == ["step-000006", "step-000009"]
    assert not [p for p in (tmp_path / "resumed").iterdir() if p.name.startswith(".tmp")]


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    _, trainer = run(tmp_path, stop_after=4)
    # A crash during the next save leaves only a temporary directory: resume must skip it.
    (tmp_path / ".tmp-step-000006-999").mkdir()
    (tmp_path / "step-000007").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step-000003"
