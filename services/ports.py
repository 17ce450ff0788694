"""Ports: is one free, and if not, who holds it. Used before binding so a conflict is one clear line.

grpcio sets ``SO_REUSEPORT`` on its listening sockets by default, so a second server on a port that
is already served does *not* fail: both listen and the kernel spreads connections between them
(``lmstack models`` alternating between two model lists). lmstack's servers therefore bind with
``grpc.so_reuseport`` off, and ``lmstack serve`` checks every port it will use before starting
anything. The check binds a plain socket (no ``SO_REUSEPORT``), which fails on any port another
socket listens on, grpcio's included.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


class PortInUse(OSError):
    """A port another process listens on; the message names the port, what wanted it, and the holder."""


def port_holder(port: int) -> str | None:
    """``"pid 1234 (python -m services.inference)"`` for the process listening on ``port``, when Linux's
    /proc says (same user or root); None elsewhere."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"pid {pid} ({cmd.strip()[:80]})"
        except OSError:
            continue
    return None


def check_port_free(host: str, port: int, what: str, hint: str = "") -> None:
    """Raise :class:`PortInUse` naming ``what`` (e.g. "inference gRPC") when ``host:port`` is taken."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise PortInUse(e.errno, f"cannot bind {what} to {host}:{port}: {e.strerror}") from None
            holder = port_holder(port)
            raise PortInUse(e.errno, f"port {port} ({what}) on {host} is already in use"
                            + (f" by {holder}" if holder else "") + (f"; {hint}" if hint else "")) from None
