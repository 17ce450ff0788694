"""`lmstack`: serve the default model in a subprocess, talk to it with the client subcommands.

Real processes on free ports; SIGINT must leave no child behind. The default model is the one
shipped in models/pycode (see README, "The default model").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

LMSTACK = [sys.executable, "-m", "services.cli"]
DEFAULT_MODEL = ROOT / "models" / "pycode"


def lmstack(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LMSTACK, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`lmstack serve` with the default model on free ports; yields (addresses, process)."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.fail(f"the default model is missing: {DEFAULT_MODEL}")
    data = tmp_path_factory.mktemp("serve-data")
    ports = {"inference": free_port(), "tokenizer": free_port(), "finetune": free_port()}
    proc = subprocess.Popen(
        [*LMSTACK, "serve", "--data-dir", str(data), "--metrics-port", "0",
         "--inference-port", str(ports["inference"]), "--tokenizer-port", str(ports["tokenizer"]),
         "--finetune-port", str(ports["finetune"])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    lines = []
    deadline = time.monotonic() + 180
    for line in proc.stdout:  # blocks until the supervisor prints or exits
        lines.append(line)
        if line.startswith("logs:") or time.monotonic() > deadline:
            break
    if proc.poll() is not None or not any("lmstack is serving" in ln for ln in lines):
        proc.kill()
        logs = "".join((data / "logs" / f).read_text()[-2000:] for f in os.listdir(data / "logs"))
        pytest.fail("lmstack serve did not come up:\n" + "".join(lines) + logs)
    addrs = {k: f"127.0.0.1:{p}" for k, p in ports.items()}
    yield addrs, proc, "".join(lines)
    if proc.poll() is None:
        proc.kill()


def test_serve_prints_every_endpoint_and_reports_serving(served):
    addrs, proc, banner = served
    from services.client import Client

    assert addrs["inference"] in banner and addrs["tokenizer"] in banner
    for addr in (addrs["inference"], addrs["tokenizer"]):
        with Client(addr) as c:
            assert c.health_status() == "SERVING"


def test_complete_returns_text_from_the_default_model(served):
    addrs, _, _ = served
    r = lmstack("complete", "def __init__(self", "--addr", addrs["inference"], "--max-tokens", "24",
                "--temperature", "0", "--no-stream")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    streamed = lmstack("complete", "def __init__(self", "--addr", addrs["inference"], "--max-tokens", "24",
                       "--temperature", "0")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == r.stdout  # streaming concatenates to the unary text (greedy)


def test_models_lists_the_default_model(served):
    addrs, _, _ = served
    r = lmstack("models", "--addr", addrs["inference"])
    assert r.returncode == 0, r.stderr
    assert "pycode" in r.stdout


def test_tokenize_matches_lmcore(served):
    from lmcore import Tokenizer

    addrs, _, _ = served
    text = "for i in range(10):\n    print(i)  # héllo ✓"
    r = lmstack("tokenize", text, "--addr", addrs["tokenizer"], "--ids-only")
    assert r.returncode == 0, r.stderr
    expected = Tokenizer.from_file(DEFAULT_MODEL).encode(text)
    assert [int(t) for t in r.stdout.split()] == expected
    pieces = lmstack("tokenize", text, "--addr", addrs["tokenizer"])
    assert f"{len(expected)} tokens" in pieces.stdout


def test_score_and_fewshot(served, tmp_path):
    addrs, _, _ = served
    r = lmstack("score", "--context", "import os\nimport ", "--choice", "sys", "--choice", "zzqx",
                "--addr", addrs["inference"])
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 2 and r.stdout.count("*") == 1
    examples = tmp_path / "ex.jsonl"
    examples.write_text('{"input": "1", "output": "one"}\n{"input": "2", "output": "two"}\n')
    r = lmstack("fewshot", "--examples", str(examples), "--query", "3", "--temperature", "0",
                "--max-tokens", "4", "--addr", addrs["inference"])
    assert r.returncode == 0, r.stderr


def test_server_errors_print_one_line_and_exit_1(served):
    addrs, _, _ = served
    r = lmstack("complete", "x", "--addr", addrs["inference"], "--temperature", "-1")
    assert r.returncode == 1
    assert r.stderr.startswith("lmstack complete: INVALID_ARGUMENT:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = lmstack("complete", "x", "--addr", addrs["inference"], "--model", "no-such-model")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_sigint_stops_every_child(served):
    _, proc, _ = served
    kids = children_of(proc.pid)
    assert len(kids) >= 2  # tokenizer + inference at least (plus redis, finetune, worker)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [k for k in kids if alive(k)] == []


def test_unreachable_server_is_one_line_and_exit_1():
    port = free_port()
    for args in (["complete", "hi", "--addr", f"127.0.0.1:{port}"], ["tokenize", "hi", "--addr", f"127.0.0.1:{port}"],
                 ["models", "--addr", f"127.0.0.1:{port}"]):
        r = lmstack(*args, "--timeout", "5")
        assert r.returncode == 1, args
        assert "cannot reach the service" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_help_everywhere():
    from services.cli import COMMANDS

    assert lmstack("--help").returncode == 0
    for name in COMMANDS:
        r = lmstack(name, "--help")
        assert r.returncode == 0 and "usage: lmstack" in r.stdout, name
