"""lmcore.training.data records (loss on completions only, line-numbered errors) and training from scratch."""

from __future__ import annotations

import json

import pytest
import torch

from lmcore.tokenizer import Tokenizer
from lmcore.training import DatasetError, RecordDataset
from lmcore.training.data import IGNORE_INDEX, read_records
from tests.helpers import ROOT

CORPUS = sorted((ROOT / "lmcore").rglob("*.py"))  # real text, present in every checkout


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, 400)


def jsonl(*records) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def test_completion_records_carry_loss_only_on_the_completion(tokenizer):
    records = read_records(jsonl({"prompt": "def add(a, b):", "completion": " return a + b"},
                                 "", {"text": "import torch"}))
    assert [n for n, _ in records] == [1, 3]  # blank lines are skipped, line numbers kept
    ds = RecordDataset.from_records(records, tokenizer, block_size=64)
    batch = ds.collate([0, 1])
    prompt = tokenizer.encode("def add(a, b):")
    completion = tokenizer.encode(" return a + b")
    n = len(prompt) + len(completion)  # inputs: prompt + completion; targets end with <|endoftext|>
    row = batch.targets[0]
    assert batch.idx[0, :n].tolist() == prompt + completion
    assert (row[: len(prompt) - 1] == IGNORE_INDEX).all()
    assert row[len(prompt) - 1 : n].tolist() == completion + [tokenizer.eos_id]
    assert (row[n:] == IGNORE_INDEX).all()  # padding
    text = tokenizer.encode("import torch") + [tokenizer.eos_id]
    assert batch.targets[1, : len(text) - 1].tolist() == text[1:]
    assert batch.n_tokens == n + len(text) - 1


@pytest.mark.parametrize("lines, line, message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"'], 2, "not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], 2, 'missing field "completion"'),
    (['["a"]'], 1, "expected a JSON object"),
    (['{"prompt": 3, "completion": "b"}'], 1, 'field "prompt" must be a string'),
    (['{"prompt": "a", "completion": ""}'], 1, "completion"),
    ([b'{"prompt": "\xff", "completion": "b"}'], 1, "UTF-8"),
    (["", "  "], 0, "empty"),
])
def test_bad_records_name_their_line(lines, line, message):
    with pytest.raises(DatasetError, match=message) as e:
        read_records(lines)
    assert e.value.line == line
    if line:
        assert str(e.value).startswith(f"line {line}:")


def test_record_longer_than_context_is_rejected(tokenizer):
    records = read_records(jsonl({"prompt": "x", "completion": "y"}, {"prompt": "a " * 100, "completion": "b"}))
    with pytest.raises(DatasetError, match=r"line 2: record is \d+ tokens .* context of 32"):
        RecordDataset.from_records(records, tokenizer, block_size=32)


def test_train_from_scratch_writes_a_loadable_model(tmp_path):
    from lmcore import load_model
    from lmcore.model import GPTConfig
    from lmcore.training import TrainConfig, train_from_scratch

    events = []
    result = train_from_scratch(CORPUS, tmp_path / "model", GPTConfig.from_preset("tiny", vocab_size=400),
                                TrainConfig(max_steps=30, batch_size=8, learning_rate=3e-3, eval_interval=15,
                                            seed=3),
                                callback=events.append)
    assert events[0].kind == "start" and events[0].parameters == result.n_parameters
    steps = [e for e in events if e.kind == "step"]
    # It learns: 30 steps drop the loss by 0.96-1.03 nats on this corpus (lmcore's own source, so it
    # changes with every commit: the bound leaves room for that, a model that learns nothing fails it).
    assert len(steps) == 30 and steps[-1].loss < steps[0].loss - 0.7
    assert result.eval_loss is not None and result.eval_loss < steps[0].loss
    model = load_model(tmp_path / "model")
    assert model.tokenizer is not None and model.config.vocab_size == model.tokenizer.vocab_size <= 400
    assert model.config.n_layer == 2 and result.n_parameters == model.num_parameters()
    info = json.loads((tmp_path / "model" / "training.json").read_text())
    assert info["arguments"]["seed"] == 3 and info["result"]["steps"] == 30
    assert {k: info["arguments"][k] for k in ("preset", "vocab_size", "block_size", "steps", "batch_size")} == \
        {"preset": "tiny", "vocab_size": 400, "block_size": 128, "steps": 30, "batch_size": 8}
    ids = torch.tensor([model.tokenizer.encode("def forward(self")])
    with torch.no_grad():
        assert model(ids).shape == (1, ids.shape[1], model.config.vocab_size)


def test_lmstack_train_cli(tmp_path, capsys):
    from services.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(p.read_text() for p in CORPUS[:3]))
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--preset", "tiny", "--steps", "4",
                 "--vocab-size", "300", "--batch-size", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "wrote" in out and (tmp_path / "m" / "model.safetensors").is_file()
    code = main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "missing.txt" in err
    # A draft model: its own shape, the first model's tokenizer as it is (other data would train another).
    other = tmp_path / "other.txt"
    other.write_text("\n".join(p.read_text() for p in CORPUS[3:5]))
    code = main(["train", "--data", str(other), "--out", str(tmp_path / "draft"), "--preset", "tiny", "--steps", "2",
                 "--tokenizer", str(tmp_path / "m"), "--n-layer", "1", "--n-embd", "32", "--batch-size", "4",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "draft" / name).read_bytes() == (tmp_path / "m" / name).read_bytes(), name
    draft = json.loads((tmp_path / "draft" / "config.json").read_text())
    target = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (draft["n_layer"], draft["n_embd"], draft["vocab_size"]) == (1, 32, target["vocab_size"])
    record = json.loads((tmp_path / "draft" / "training.json").read_text())["arguments"]
    assert record["tokenizer"] == str(tmp_path / "m") and record["n_layer"] == 1
    capsys.readouterr()
    for bad, message in ((["--tokenizer", str(tmp_path / "m"), "--vocab-size", "300"], "exclude each other"),
                         (["--tokenizer", str(tmp_path / "nowhere")], "nowhere")):
        code = main(["train", "--data", str(other), "--out", str(tmp_path / "y"), "--steps", "1", *bad])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and message in err, err


def test_train_from_scratch_is_reproducible(tmp_path):
    """Same files, same arguments, same seed: the same tokenizer and bit-identical weights."""
    from safetensors.torch import load_file

    from lmcore.model import GPTConfig
    from lmcore.training import TrainConfig, train_from_scratch

    model_config = GPTConfig.from_preset("tiny", vocab_size=300, dropout=0.1)
    for name in ("a", "b"):
        train_from_scratch(CORPUS[:4], tmp_path / name, model_config, TrainConfig(max_steps=5, batch_size=4, seed=11))
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_from_scratch_resumes_from_its_checkpoints(tmp_path):
    """A rerun into the same directory continues from ``out/checkpoints`` instead of starting over."""
    from lmcore.model import GPTConfig
    from lmcore.training import TrainConfig, train_from_scratch

    model_config = GPTConfig.from_preset("tiny", vocab_size=300)
    first = []
    train_from_scratch(CORPUS[:4], tmp_path / "m", model_config,
                       TrainConfig(max_steps=4, batch_size=4, checkpoint_interval=2, seed=2), callback=first.append)
    assert (tmp_path / "m" / "checkpoints" / "step-000004").is_dir()
    again = []
    result = train_from_scratch(CORPUS[:4], tmp_path / "m", model_config,
                                TrainConfig(max_steps=6, batch_size=4, checkpoint_interval=2, seed=2),
                                callback=again.append)
    assert (again[0].kind, again[0].step, again[0].total_steps) == ("start", 4, 6)
    assert [e.step for e in again if e.kind == "step"] == [5, 6] and result.steps == 6
