"""Shared fixtures: the real GPT-2 vocabulary, a real redis-server, tiny checkpoints, torch threads.

Helpers the fixtures use (paths, free ports, models, servers) live in ``tests/helpers``; tests mirror
the package layout (``tests/lmcore/<layer>/``, ``tests/services/``, ``tests/deploy/``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import GPT2_TIKTOKEN, free_port, gpt2_tokenizer
from tests.helpers.models import save_tiny_model

# Two cores, many processes: tests run torch on one intra-op thread, like one engine's decode loop.
torch.set_num_threads(1)


@pytest.fixture
def gpt2_tiktoken_path(tmp_path: Path) -> Path:
    """A private copy of the real GPT-2 rank file (the shared fixture is never touched)."""
    if not GPT2_TIKTOKEN.is_file():
        pytest.skip(f"{GPT2_TIKTOKEN} not found")
    dst = tmp_path / "gpt2.tiktoken"
    shutil.copyfile(GPT2_TIKTOKEN, dst)
    return dst


class RedisServer:
    """A real ``redis-server`` on a free port with append-only persistence in a temp dir."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """kill -9: no shutdown, no final save (appendfsync always has written every command)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    d = tmp_path / "redis"
    d.mkdir()
    server = RedisServer(d)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("LMSTACK_SKIP_CUDA") != "1"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny model directories: ``tiny`` (context 128) and ``tiny-b`` (different weights, context 96)."""
    root = tmp_path_factory.mktemp("models")
    tok = gpt2_tokenizer()
    return {"tiny": save_tiny_model(root / "tiny", 0, tok),
            "tiny-b": save_tiny_model(root / "tiny-b", 1, tok, block_size=96)}
