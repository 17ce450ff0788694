"""lm-evaluation-harness against lmstack's ``/v1/completions``, beside its own ``--model hf``, offline.

The test writes a small multiple-choice task (a task YAML with ``dataset_path: json`` over a local
JSONL) and runs the real harness twice (``lm_eval.simple_evaluate``, what the ``lm_eval`` command
line calls, in this process to save two heavy imports) on the same model directory: once as
``--model local-completions`` against the OpenAI-compatible API (prompts sent as token ids from the
model directory's tokenizer, scored through ``echo`` + ``logprobs``), once as ``--model hf``
(transformers on the same checkpoint). Per-request log-likelihoods agree within 1e-3 and the
accuracies are equal. ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcore.model import save_pretrained
from services.config import InferenceSettings
from services.inference.__main__ import setup
from tests.helpers import free_port, gpt2_tokenizer
from tests.helpers.models import gpt2_vocab_model
from tests.helpers.servers import ServerThread

DOCS = [
    {"question": "The opposite of hot is", "choices": [" cold", " warm", " blue"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five", " three"], "answer": 0},
    {"question": "In Python, a list is written with", "choices": [" brackets", " braces", " quotes"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": [" green", " blue", " loud"], "answer": 1},
    {"question": "def f(x): return", "choices": [" x", " None", " 1 + 1"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin", " north"], "answer": 0},
]
TASK = """task: lmstack_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def lm_eval(model: str, model_args: str, tasks_dir: Path, **kw) -> dict:
    """One run of the harness (its Python entry point, what the ``lm_eval`` command calls, so this
    test process's already-imported torch and transformers are reused): accuracy and, per doc, the
    log-likelihood of each choice."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["lmstack_tiny_mc"], batch_size=1,
                          task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True, **kw)
    samples = out["samples"]["lmstack_tiny_mc"]
    return {"acc": out["results"]["lmstack_tiny_mc"]["acc,none"],
            "loglikelihoods": {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for var, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(var, value)


@pytest.mark.timeout(900)  # two harness runs on a loaded 2-core box
def test_lm_eval_local_completions_agrees_with_hf(tmp_path, offline):
    model_dir = tmp_path / "model"
    save_pretrained(gpt2_vocab_model(seed=21), model_dir, tokenizer=gpt2_tokenizer())
    (tmp_path / "tasks").mkdir()
    data = tmp_path / "tasks" / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks" / "lmstack_tiny_mc.yaml").write_text(TASK.format(data=data))
    settings = InferenceSettings(models=[f"tiny={model_dir}"], port=0, http_port=free_port(), max_batch_size=4)
    server = ServerThread(settings, "inference", setup).start()
    try:
        ours = lm_eval("local-completions",
                       f"model=tiny,base_url=http://127.0.0.1:{settings.http_port}/v1/completions,"
                       f"tokenizer_backend=huggingface,tokenizer={model_dir},num_concurrent=1,max_retries=1",
                       tmp_path / "tasks")
    finally:
        server.stop()
    ref = lm_eval("hf", f"pretrained={model_dir},dtype=float32", tmp_path / "tasks", device="cpu")

    assert sorted(ours["loglikelihoods"]) == sorted(ref["loglikelihoods"]) == list(range(len(DOCS)))
    for doc_id, values in ref["loglikelihoods"].items():
        assert ours["loglikelihoods"][doc_id] == pytest.approx(values, abs=1e-3), doc_id
    assert ours["acc"] == ref["acc"]
