"""README's "From a corpus to looking inside", every command in order, against its own ``lmstack serve``.

The section's blocks are read from README.md itself (each is marked ``<!-- checked:
tests/test_tutorial.py -->``, so ``tests/test_readme.py`` leaves them to this test). Two changes
from what a reader types, both to fit a shared test machine: ``LMSTACK_MAX_STEPS=20`` caps the
training run (as the section says), and the ``lmstack serve`` block gets free ports appended
(``--inference-port ... --http-port ... --metrics-port 0``), which the other commands find through
``LMSTACK_INFERENCE_ADDR`` / ``LMSTACK_TOKENIZER_ADDR`` / ``LMSTACK_FINETUNE_ADDR``. Everything
runs in a fresh working directory; the serve block runs in the background, as in its own terminal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port
from tests.services.test_inspect import assert_picture

SECTION = "## From a corpus to looking inside"
MARK = "<!-- checked: tests/test_tutorial.py -->"


def tutorial_blocks() -> list[tuple[str, str]]:
    """``[(language, text)]`` of the section's checked blocks, in order."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, "README.md lost its tutorial section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    found = re.findall(re.escape(MARK) + r"\n```(\w+)\n(.*?)\n```", section, flags=re.S)
    return [(lang, body) for lang, body in found]


def test_the_section_is_all_checked_blocks():
    text = (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    assert len(tutorial_blocks()) == text.count("```") // 2 == 6


@pytest.mark.timeout(900)  # ~30 s alone; a loaded machine runs train, serve and a fine-tune slowly
def test_tutorial_runs_as_written(tmp_path):
    work = tmp_path / "tutorial"
    work.mkdir()
    ports = {"inference": free_port(), "tokenizer": free_port(), "finetune": free_port(), "http": free_port()}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "LMSTACK_MAX_STEPS": "20", "XDG_CACHE_HOME": str(work / ".cache"), "PYTHONUNBUFFERED": "1",
           "LMSTACK_INFERENCE_ADDR": f"127.0.0.1:{ports['inference']}",
           "LMSTACK_TOKENIZER_ADDR": f"127.0.0.1:{ports['tokenizer']}",
           "LMSTACK_FINETUNE_ADDR": f"127.0.0.1:{ports['finetune']}"}
    for var in ("LMSTACK_API_KEY", "LMSTACK_DATA_DIR", "LMSTACK_REDIS_URL"):
        env.pop(var, None)
    outputs: list[str] = []
    serve = None
    log_path = work / "serve.log"
    try:
        for lang, body in tutorial_blocks():
            if lang == "python":
                r = subprocess.run([sys.executable, "-c", body], cwd=work, env=env, capture_output=True, text=True,
                                   timeout=300)
                assert r.returncode == 0, f"the tutorial's Python failed:\n{r.stderr[-3000:]}"
                outputs.append(r.stdout)
                continue
            if body.startswith("lmstack serve"):
                command = body + (f" --inference-port {ports['inference']} --tokenizer-port {ports['tokenizer']}"
                                  f" --finetune-port {ports['finetune']} --http-port {ports['http']}"
                                  " --metrics-port 0")
                log = open(log_path, "w")
                serve = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=work, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
                log.close()
                deadline = time.monotonic() + 240
                while "lmstack is serving" not in log_path.read_text():
                    if serve.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"lmstack serve did not start:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.2)
                page = f"http://127.0.0.1:{ports['http']}/inspect"
                deadline = time.monotonic() + 60  # the page, on the platform's HTTP API
                while True:
                    try:
                        with urllib.request.urlopen(page, timeout=10) as r:
                            assert r.status == 200 and b"<title>lmstack" in r.read()
                        break
                    except OSError:
                        assert time.monotonic() < deadline, f"{page} not served:\n{log_path.read_text()[-2000:]}"
                        time.sleep(0.3)
                outputs.append("")
                continue
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=work, env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, f"exit {r.returncode}:\n{body}\n--- stderr:\n{r.stderr[-3000:]}"
            outputs.append(r.stdout)
    finally:
        if serve is not None:
            os.killpg(serve.pid, signal.SIGINT)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
    train, _, complete, inspect, inspect_again, compare = outputs
    assert (work / "models" / "tutorial" / "model.safetensors").is_file()
    assert "tokens," in complete and len(complete.strip().splitlines()) >= 3  # tokenize's table, then the text
    assert inspect.startswith("tutorial: ") and "2 layers x 4 heads" in inspect and "logit lens" in inspect
    for name in ("before.png", "head.png", "after.png"):
        assert_picture(work / name)
    heads = re.findall(r"^(\S+): \d+ tokens", inspect_again, flags=re.M)
    assert heads[0] == "tutorial" and re.fullmatch(r"ft:tutorial:add:\w+", heads[1]), inspect_again
    moved = [float(x) for line in compare.splitlines() if "attention moved" in line
             for x in re.findall(r"\d+\.\d+", line)]
    assert len(moved) == 2 * 4 and max(moved) > 0, compare  # 2 layers x 4 heads, and the adapter moved some
    before, after = map(float, re.search(r"([\d.]+) bits before, ([\d.]+) after", compare).groups())
    assert after < before  # fine-tuned on that very text, the adapter finds it less surprising
