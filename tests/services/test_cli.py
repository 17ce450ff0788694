"""`lmstack`: serve the default model in a subprocess, talk to it with the client subcommands.

Real processes on free ports; SIGINT must leave no child behind. The default model is the one
shipped in models/pycode (see README, "The default model").
"""

from __future__ import annotations

import json
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
         "--finetune-port", str(ports["finetune"]), "--http-port", str(free_port())],
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


def test_serve_banner_says_how_to_reach_the_cli(served):
    _, proc, banner = served
    line = proc.stdout.readline()  # printed right after the "logs:" line the fixture stopped at
    assert line.startswith("CLI: ") and "lmstack" in line and "activate" in line, line


def test_a_second_serve_on_the_same_data_dir_is_refused(served, tmp_path):
    addrs, proc, banner = served
    data = next(ln.split("logs: ")[1].split()[0] for ln in banner.splitlines() if ln.startswith("logs:"))
    data_dir = str(Path(data).parent)
    r = lmstack("serve", "--data-dir", data_dir, "--inference-port", str(free_port()), "--tokenizer-port",
                str(free_port()), "--finetune-port", str(free_port()), "--metrics-port", "0", timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"{data_dir} is in use by another lmstack serve (pid {proc.pid})" in r.stderr, r.stderr
    assert (Path(data_dir) / "lmstack.lock").read_text().strip() == str(proc.pid)


def test_serve_refuses_a_port_in_use_before_starting_anything(served, tmp_path):
    addrs, proc, _ = served
    busy = addrs["inference"].split(":")[1]
    r = lmstack("serve", "--data-dir", str(tmp_path / "data"), "--inference-port", busy, "--tokenizer-port",
                str(free_port()), "--finetune-port", str(free_port()), "--metrics-port", "0", timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"inference gRPC port 127.0.0.1:{busy} is already in use by pid " in r.stderr, r.stderr
    assert "services.inference" in r.stderr and "--inference-port" in r.stderr
    assert not (tmp_path / "data" / "redis").exists()  # nothing was started


def test_stop_strings_are_unescaped(served):
    addrs, _, _ = served
    args = ("complete", "import os", "--no-stream", "--temperature", "0", "--max-tokens", "64", "-v",
            "--addr", addrs["inference"])
    escaped = lmstack(*args, "--stop", "\\n\\n")  # what a shell passes for --stop "\n\n"
    literal = lmstack(*args, "--stop", "\n\n")      # what it passes for --stop $'\n\n'
    assert escaped.returncode == 0 and literal.returncode == 0
    assert "finish_reason=stop" in escaped.stderr and escaped.stdout == literal.stdout



def test_complete_with_a_json_schema_a_regex_or_choices(served, tmp_path):
    """`lmstack complete --json-schema FILE | --regex RE | --choice A --choice B`, streamed and not."""
    import re

    addrs, _, _ = served
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "size": {"type": "integer", "minimum": 1, "maximum": 64}},
              "required": ["name", "size"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    base = ("complete", "config = ", "--addr", addrs["inference"], "--max-tokens", "60", "--seed", "3",
            "--temperature", "1", "-v")
    for stream in ("--stream", "--no-stream"):
        r = lmstack(*base, stream, "--json-schema", str(tmp_path / "schema.json"))
        assert r.returncode == 0 and "finish_reason=stop" in r.stderr, r.stderr
        obj = json.loads(r.stdout)
        assert set(obj) == {"name", "size"} and 1 <= obj["size"] <= 64 and len(obj["name"]) <= 8
        r = lmstack(*base, stream, "--regex", r"v[0-9]\.[0-9]{1,2}")
        assert r.returncode == 0 and re.fullmatch(r"v[0-9]\.[0-9]{1,2}", r.stdout.rstrip("\n")), r.stdout
        r = lmstack(*base, stream, "--choice", "red", "--choice", "green")
        assert r.returncode == 0 and r.stdout.rstrip("\n") in ("red", "green"), r.stdout
    bad = lmstack(*base, "--regex", "[0-9")
    assert bad.returncode == 1 and bad.stderr.startswith("lmstack complete: INVALID_ARGUMENT: invalid regex"), bad.stderr
    missing = lmstack(*base, "--json-schema", str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "nope.json" in missing.stderr and "Traceback" not in missing.stderr
    both = lmstack(*base, "--regex", "a", "--choice", "a")
    assert both.returncode == 2 and "not allowed with" in both.stderr

def test_finetune_options_go_before_or_after_the_action():
    port = free_port()  # nothing listens: both spellings must reach the same one-line error
    for argv in (("finetune", "--addr", f"127.0.0.1:{port}", "list"), ("finetune", "list", "--addr",
                                                                        f"127.0.0.1:{port}", "--timeout", "2")):
        r = lmstack(*argv, timeout=60)
        assert r.returncode == 1 and f"cannot reach the fine-tuning service at 127.0.0.1:{port}" in r.stderr, r.stderr


def test_models_while_loading_says_so(tmp_path):
    """A server that listens but has not loaded its models: exit 1 and say so (or wait with --wait)."""
    import asyncio
    import threading

    from services.config import ServiceSettings
    from services.server import GrpcServer

    port = free_port()
    started, stop = threading.Event(), threading.Event()

    def serve():
        async def main():
            server = GrpcServer(ServiceSettings(host="127.0.0.1", port=port), "inference")
            await server.start()  # health NOT_SERVING until set_serving(): "still loading"
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await server.stop(grace=0)

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        r = lmstack("models", "--addr", f"127.0.0.1:{port}", timeout=60)
        assert r.returncode == 1 and "is still loading its models" in r.stderr and "--wait" in r.stderr, r.stderr
        r = lmstack("models", "--addr", f"127.0.0.1:{port}", "--wait", "--timeout", "1", timeout=60)
        assert r.returncode == 1 and "was still loading its models after 1s" in r.stderr, r.stderr
    finally:
        stop.set()
        thread.join(10)


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


def test_train_refuses_to_overwrite_and_caps_steps(tmp_path):
    """A non-empty --out that is not a resumable run is refused (the shipped model too); --overwrite
    replaces it; LMSTACK_MAX_STEPS caps --steps; a resumed finished run reports no bogus speed."""
    corpus = [str(p) for p in sorted((ROOT / "lmcore" / "engine").glob("*.py"))]
    out = tmp_path / "mine"
    base = ("train", "--data", *corpus, "--glob", "*.py", "--preset", "tiny", "--vocab-size", "300",
            "--block-size", "32", "--batch-size", "4", "--eval-interval", "2", "--no-progress")
    capped = {"LMSTACK_MAX_STEPS": "3"}
    r = lmstack(*base, "--out", str(out), "--steps", "1000", env=capped)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "training.json").read_text())["result"]["steps"] == 3
    again = lmstack(*base, "--out", str(out), "--steps", "2", env=capped)
    assert again.returncode == 1 and "already holds files" in again.stderr and "--overwrite" in again.stderr
    shipped = lmstack(*base, "--out", str(DEFAULT_MODEL), "--steps", "2")
    assert shipped.returncode == 1 and "already holds files" in shipped.stderr
    r = lmstack(*base, "--out", str(out), "--steps", "2", "--overwrite", env=capped)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "training.json").read_text())["result"]["steps"] == 2
    # A resumable run (with checkpoints) is its own: rerunning it after it finished trains nothing more.
    ck = tmp_path / "ck"
    assert lmstack(*base, "--out", str(ck), "--steps", "2", "--checkpoint-interval", "1").returncode == 0
    resumed = lmstack(*base, "--out", str(ck), "--steps", "2", "--checkpoint-interval", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "(0 tok/s)" in resumed.stdout, resumed.stdout
