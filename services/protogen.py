"""Generate the Python gRPC stubs from ``proto/`` into ``services/gen/`` (``make proto``).

The stubs are build outputs, never committed (TGI's habit): the ``.proto`` files are the contract.
protoc writes absolute imports (``from lmstack.v1 import common_pb2``); they are rewritten to
``services.gen.lmstack.v1`` so the stubs import without touching ``sys.path``.
Regeneration is skipped when every stub is newer than every ``.proto``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "services" / "gen"


def stale() -> bool:
    protos = list(PROTO_DIR.rglob("*.proto"))
    stubs = list(OUT_DIR.rglob("*_pb2.py"))
    if len(stubs) < len(protos):
        return True
    newest_proto = max((p.stat().st_mtime for p in protos), default=0)
    oldest_stub = min((p.stat().st_mtime for p in stubs), default=0)
    return newest_proto > oldest_stub


def generate(force: bool = False) -> None:
    from grpc_tools import protoc

    if not force and not stale():
        return
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={OUT_DIR}",
            f"--pyi_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")
    for d in [OUT_DIR, *[p for p in OUT_DIR.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    pattern = re.compile(r"^from lmstack\.v1 import", re.M)
    for f in OUT_DIR.rglob("*.py*"):
        text = f.read_text()
        new = pattern.sub("from services.gen.lmstack.v1 import", text)
        if new != text:
            f.write_text(new)


if __name__ == "__main__":
    generate(force="--force" in sys.argv)
