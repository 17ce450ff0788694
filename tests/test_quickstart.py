"""The README's two commands are the ones the Makefile runs, checked on a fresh clone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT


def readme_steps(target: str) -> list[str]:
    """The fenced block that follows "`make <target>` runs:" in README.md, one command per line."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"`make {target}` runs:\s*(?:<!--.*?-->\s*)?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert m, f"README.md has no '`make {target}` runs:' block"
    return [line.strip() for line in m.group(1).splitlines() if line.strip()]


def make_dry_run(clone: Path, target: str) -> list[str]:
    # Run as a newcomer would: not inside another make (CI's `make test` exports MAKEFLAGS/MAKELEVEL,
    # which would add "Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=clone, capture_output=True,
                         text=True, check=True, env=env)
    # the stamp file is bookkeeping, not a step a reader needs
    return [line.strip() for line in out.stdout.splitlines() if line.strip() and not line.startswith("touch ")]


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make")
@pytest.mark.parametrize("target", ["test", "serve"])
def test_readme_names_the_steps_make_runs_on_a_fresh_clone(tmp_path, target):
    clone = tmp_path / "lmstack"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (clone / ".venv").exists()  # a fresh clone: every bootstrap step shows up
    assert make_dry_run(clone, target) == readme_steps(target)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
