"""README.md as a newcomer runs it: every block, in order, against a live ``lmstack serve``.

Blocks are read from the Markdown itself, so a changed command or output fails here:

* ```` ```console ````: ``$ command`` lines, each followed by the output it must print (exactly,
  up to trailing whitespace);
* ```` ```bash ````: a script that must exit 0;
* ```` ```python ````: snippets run in order in one interpreter (state carries over);
* a block right after ``<!-- illustrative ... -->`` or ``<!-- checked: ... -->`` is not run here
  (the first is an example only; the second names the test that checks it).

The platform runs on its default ports (the README's commands name no addresses) in a temporary
working directory holding ``.venv`` and ``models/pycode`` as links, so ``models/mine`` and
``data/`` land there, never in the checkout. ``LMSTACK_MAX_STEPS`` caps training steps, as the
README says.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.ports import PortInUse, check_port_free
from tests.helpers import ROOT

DEFAULT_PORTS = {50051: "inference", 50052: "tokenizer", 50053: "fine-tuning", 9101: "metrics", 9102: "metrics",
                 9103: "metrics", 9104: "metrics", 8000: "OpenAI-compatible HTTP"}
SKIP_MARK = re.compile(r"<!--\s*(illustrative|checked)\b")


@dataclass
class Block:
    lang: str
    text: str
    line: int  # where the block starts in the file, for messages


def blocks(path: Path) -> list[Block]:
    """The runnable fenced blocks of a Markdown file, in order."""
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        if m.group(1) in ("console", "bash", "python") and not SKIP_MARK.search(before):
            indent = len(lines[start]) - len(lines[start].lstrip())
            out.append(Block(m.group(1), "\n".join(b[indent:] for b in body), start + 1))
    return out


def console_steps(text: str) -> list[tuple[str, str]]:
    """``[(command, expected output)]`` of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"output before any command: {line!r}"
            steps[-1][1].append(line)
    return [(cmd, "\n".join(out)) for cmd, out in steps]


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """``lmstack serve`` on its default ports, in a fresh working directory."""
    busy = []
    for port, what in DEFAULT_PORTS.items():
        try:
            check_port_free(what, "127.0.0.1", port)
        except PortInUse as e:
            busy.append(str(e))
    if busy:
        message = "the README's commands use lmstack's default ports: " + "; ".join(busy)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message + " (stop that lmstack serve to run this test)")
    work = tmp_path_factory.mktemp("newcomer")
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / "models").mkdir()
    (work / "models" / "pycode").symlink_to(ROOT / "models" / "pycode")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "LMSTACK_MAX_STEPS": "30", "XDG_CACHE_HOME": str(work / ".cache"), "PYTHONUNBUFFERED": "1"}
    for var in ("LMSTACK_INFERENCE_ADDR", "LMSTACK_TOKENIZER_ADDR", "LMSTACK_FINETUNE_ADDR", "LMSTACK_API_KEY",
                "LMSTACK_DATA_DIR", "LMSTACK_REDIS_URL"):
        env.pop(var, None)
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "lmstack"), "serve"], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while "lmstack is serving" not in (work / "serve.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"lmstack serve did not start:\n{(work / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.2)
    yield work, env
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def run_blocks(path: Path, work: Path, env: dict) -> int:
    """Run every runnable block of ``path``; returns how many commands and snippets ran."""
    ran, python = 0, []
    for block in blocks(path):
        where = f"{path.name}:{block.line}"
        if block.lang == "python":
            python.append(f"# {where}\n{block.text}")
            continue
        if block.lang == "bash":
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=work, env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, f"{where}: exit {r.returncode}\n{block.text}\n--- stderr:\n{r.stderr[-3000:]}"
            ran += 1
            continue
        for command, expected in console_steps(block.text):
            r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"{where}: `{command}` exited {r.returncode}: {r.stderr[-2000:]}"
            assert _normalise(r.stdout) == _normalise(expected), f"{where}: `{command}` printed:\n{r.stdout}"
            ran += 1
    if python:
        script = work / f"{path.stem}_snippets.py"
        script.write_text("\n\n".join(python) + "\n")
        r = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{path.name}'s Python snippets failed:\n{r.stderr[-3000:]}"
        ran += len(python)
    return ran


DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_blocks_are_found_and_marked():
    """The parser sees the README's blocks; the quickstart blocks are the checked ones."""
    found = blocks(ROOT / "README.md")
    assert {b.lang for b in found} == {"console", "bash", "python"}
    assert not any("make serve" in b.text for b in found)  # checked by test_quickstart, not run here
    assert console_steps("$ a\nx\n\ny\n$ b") == [("a", "x\n\ny"), ("b", "")]


def test_readme_runs_as_written(platform):
    work, env = platform
    assert run_blocks(ROOT / "README.md", work, env) >= 8
    # What the blocks promised: the fine-tuned model is served, the trained model and dataset are
    # in the working directory, and the shipped model was not touched.
    listed = subprocess.run(["lmstack", "models"], cwd=work, env=env, capture_output=True, text=True).stdout
    assert re.search(r"ft:pycode:add:\w+", listed), listed
    assert (work / "models" / "mine" / "model.safetensors").is_file()
    assert (work / "models" / "pycode").is_symlink()


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_docs_pages_run_as_written(platform, page):
    """Each docs page's runnable blocks (most are API sketches marked illustrative, each naming the
    test that exercises those calls)."""
    work, env = platform
    run_blocks(page, work, env)
