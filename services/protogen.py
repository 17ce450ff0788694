"""Generate the Python gRPC stubs from ``proto/`` into ``services/gen/`` (``make proto``).

The stubs are build outputs, never committed (TGI's habit): the ``.proto`` files are the contract.
protoc writes absolute imports (``from lmstack.v1 import common_pb2``); they are rewritten to
``services.gen.lmstack.v1`` so the stubs import without touching ``sys.path``.
Regeneration is skipped when every stub is newer than every ``.proto``.

``python -m services.protogen --check`` regenerates into a temporary directory and exits non-zero
when ``services/gen`` differs (stale stubs); ``tests/test_services_proto.py`` runs the same check.
"""

from __future__ import annotations

import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "services" / "gen"


def stale(out_dir: Path = OUT_DIR) -> bool:
    protos = list(PROTO_DIR.rglob("*.proto"))
    stubs = list(out_dir.rglob("*_pb2.py"))
    if len(stubs) < len(protos):
        return True
    # This file is an input too: a change to the rewriting below must regenerate the stubs.
    newest_proto = max((p.stat().st_mtime for p in [*protos, Path(__file__)]), default=0)
    oldest_stub = min((p.stat().st_mtime for p in stubs), default=0)
    return newest_proto > oldest_stub


def generate(force: bool = False, out_dir: Path = OUT_DIR) -> None:
    from grpc_tools import protoc

    if not force and not stale(out_dir):
        return
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")
    for d in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    pattern = re.compile(r"^from lmstack\.v1 import", re.M)
    # The messages' __module__ too, so they pickle (Ray Serve ships requests between processes).
    module_name = re.compile(r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, 'lmstack\.v1\.")
    for f in out_dir.rglob("*.py*"):
        text = f.read_text()
        new = pattern.sub("from services.gen.lmstack.v1 import", text)
        new = module_name.sub("BuildTopDescriptorsAndMessages(DESCRIPTOR, 'services.gen.lmstack.v1.", new)
        if new != text:
            f.write_text(new)


def check(out_dir: Path = OUT_DIR) -> list[str]:
    """Stub files in ``out_dir`` that differ from a fresh generation (missing ones included)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(force=True, out_dir=fresh)
        bad = []
        for f in sorted(fresh.rglob("*_pb2*.py*")):
            rel = f.relative_to(fresh)
            if not (out_dir / rel).is_file() or not filecmp.cmp(f, out_dir / rel, shallow=False):
                bad.append(str(rel))
        return bad


if __name__ == "__main__":
    if "--check" in sys.argv:
        stale_files = check()
        if stale_files:
            raise SystemExit(f"stale gRPC stubs (run make proto): {stale_files}")
        print("gRPC stubs are up to date")
    else:
        generate(force="--force" in sys.argv)
