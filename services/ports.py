"""Ports: is one free, and if not, who holds it. Used before binding so a conflict is one clear line.

grpcio sets ``SO_REUSEPORT`` on its listening sockets by default, so a second server on a port that
is already served does *not* fail: both listen and the kernel spreads connections between them
(``lmstack models`` alternating between two model lists). lmstack's servers therefore bind with
``grpc.so_reuseport`` off (``services.server.server_options``), check their ports first
(``GrpcServer.start``), and ``lmstack serve`` checks every port it will use before starting anything.
"""

from __future__ import annotations

import errno
import os
import socket


class PortInUse(RuntimeError):
    """A port this server needs is held by another socket; the message names it (and its process)."""

    def __init__(self, what: str, host: str, port: int, hint: str = "stop that process or pick another port"):
        holder = port_holder(port)
        self.host, self.port = host, port
        super().__init__(f"{what} port {host}:{port} is already in use"
                         + (f" by {holder}" if holder else "") + f"; {hint}")


def port_holder(port: int) -> str | None:
    """``pid N (command line)`` of the process listening on TCP ``port``, when it can be found
    cheaply: /proc on Linux (only processes this user may inspect), else psutil when installed."""
    try:
        return _proc_port_holder(port)
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f"pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:120]})"
    except (psutil.Error, OSError):
        return None
    return None


def _proc_port_holder(port: int) -> str | None:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; st 0A is LISTEN; field 9 is the socket's inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # another user's process, or gone
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid} ({cmd[:120]})"
            except OSError:
                continue
    return None


def check_port_free(what: str, host: str, port: int, hint: str | None = None) -> None:
    """Raise ``PortInUse`` when ``host:port`` cannot be bound (port 0: any free one, always fine).

    A probe bind with ``SO_REUSEADDR`` (as grpc and http.server set it), so a port left in
    TIME_WAIT by a previous run is free while a listening one is not. It runs before grpc's own
    bind because grpc reports a failed bind with a C-core log line and a generic RuntimeError.
    """
    if not port:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"{what} address {host}:{port}: {e}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUse(what, host, port, *([hint] if hint else [])) from None
                if e.errno != errno.EADDRNOTAVAIL:  # e.g. no IPv6 on this host: grpc skips it too
                    raise ValueError(f"cannot bind {what} address {host}:{port}: {e.strerror}") from None
