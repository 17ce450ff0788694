"""``lmstack serve``: the whole platform on one machine, as supervised local processes.

Children (each the same command a container in ``docker-compose.yml`` runs):

    redis-server            private, append-only, in <data-dir>/redis   (unless LMSTACK_REDIS_URL is set);
                            loopback only, protected mode, password generated into <data-dir>/redis.password
    python -m services.tokenizer
    python -m services.inference            gRPC, and the OpenAI-compatible HTTP API (--http-port)
    python -m services.finetune            fine-tuning API
    python -m services.finetune.worker     one worker

Supervision policy: a child that exits on its own is reported and restarted, with a back-off; if
one crashes more than ``MAX_RESTARTS`` times within ``RESTART_WINDOW_S`` the supervisor stops
everything and exits 1 (a crash loop is a bug to read about, not to hide). Ctrl-C or SIGTERM stops
all children cleanly: SIGTERM (each service drains in-flight RPCs), then SIGKILL after the grace
period. Children run in their own sessions, so a terminal's Ctrl-C reaches only the supervisor,
which then stops them in order.

Exposure is checked before anything starts (``services.tls.check_exposure``): a non-loopback
``--host`` needs API keys (``--api-keys-file``, or ``<data-dir>/api-keys.yaml`` from ``lmstack
keys create``) and TLS (``--tls-cert``/``--tls-key``), or an explicit ``--insecure``.

Conflicts are loud, before anything starts: every port the platform will bind (gRPC, metrics,
an explicit Redis port) is checked first, and a port in use fails with one line naming it and,
when /proc says, the process holding it (``services.ports``). The data directory is locked
(``<data-dir>/lmstack.lock``, an ``flock`` held by the supervisor and inherited by its children):
a second ``lmstack serve`` on the same directory is refused, so two private Redis servers never
share ``<data-dir>/redis``. A lock left by a process that died is released by the kernel with it,
so a stale lock never blocks; a lock still held by orphaned children (the supervisor was killed
with ``kill -9``) names their pids.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
READY_TIMEOUT_S = 120.0

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "pycode"
LOCK_FILE = "lmstack.lock"


def add_arguments(p) -> None:
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                   help="model directory to serve (repeatable; default: the built-in 'pycode' model). "
                        "A Hugging Face gpt2 directory works: --model gpt2=/path/to/gpt2")
    p.add_argument("--host", default="127.0.0.1", help="address the services listen on")
    p.add_argument("--inference-port", type=int, default=50051)
    p.add_argument("--tokenizer-port", type=int, default=50052)
    p.add_argument("--finetune-port", type=int, default=50053)
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...) on the "
                        "inference service's engines; 0 disables it")
    p.add_argument("--metrics-port", type=int, default=9101,
                   help="first Prometheus port: inference, tokenizer, fine-tuning API, worker follow on; "
                        "0 disables metrics")
    p.add_argument("--data-dir", default=os.environ.get("LMSTACK_DATA_DIR", "data"),
                   help="where the model store, datasets and the private Redis live (default ./data)")
    p.add_argument("--redis-port", type=int, default=0, help="port of the private redis-server (0: a free one)")
    p.add_argument("--no-finetune", action="store_true", help="serve only tokenizer and inference")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--quantize", action="append", default=[], metavar="[NAME=]int8",
                   help="quantize weights at load (CPU): 'int8' for every model or NAME=int8 for one "
                        "(repeatable); default fp32")
    p.add_argument("--speculation", default=None, choices=["auto", "off", "prompt_lookup", "draft"],
                   help="speculative decoding default (requests may override): auto = prompt lookup for "
                        "greedy requests (the default)")
    p.add_argument("--speculative-tokens", type=int, default=None, help="most tokens proposed per step (1-16)")
    p.add_argument("--draft-model", action="append", default=[], metavar="TARGET=PATH",
                   help="a draft model directory for TARGET's 'draft' speculation (same tokenizer, smaller)")
    p.add_argument("--api-key", action="append", default=[],
                   help="require this API key (repeatable): shorthand for one admin tenant")
    p.add_argument("--api-keys-file", default=os.environ.get("LMSTACK_API_KEYS_FILE", ""),
                   help="tenants' keys file (sha256 -> tenant, role, quotas; `lmstack keys create`); default "
                        "$LMSTACK_API_KEYS_FILE, else <data-dir>/api-keys.yaml when it exists")
    p.add_argument("--tls-cert", default=os.environ.get("LMSTACK_TLS_CERT", ""),
                   help="TLS certificate (PEM) for every gRPC server; it must also name localhost (the "
                        "readiness check connects as localhost)")
    p.add_argument("--tls-key", default=os.environ.get("LMSTACK_TLS_KEY", ""), help="TLS private key (PEM)")
    p.add_argument("--tls-client-ca", default=os.environ.get("LMSTACK_TLS_CLIENT_CA", ""),
                   help="require client certificates signed by this CA (mTLS); the readiness check presents "
                        "--tls-cert, so it must chain to this CA too")
    p.add_argument("--tls-ca", default=os.environ.get("LMSTACK_TLS_CA", ""),
                   help="CA that signed --tls-cert, for the readiness check (default: --tls-cert itself)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without API keys or without TLS (a trusted network)")


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    endpoint: str = ""  # host:port of its gRPC server, "" for processes without one
    label: str = ""  # what the endpoint list shows for a process without a gRPC server
    metrics_port: int = 0
    http_url: str = ""  # its OpenAI-compatible API, "" for none
    proc: subprocess.Popen | None = None
    crashes: list[float] = field(default_factory=list)

    def start(self, log_dir: Path, keep_fds: tuple[int, ...] = ()) -> None:
        log = open(log_dir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            self.argv, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=REPO_ROOT, pass_fds=keep_fds,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class DataDirLock:
    """``<data-dir>/lmstack.lock``: one ``lmstack serve`` per data directory.

    An exclusive ``flock`` on the file, taken before anything starts and held until the supervisor
    and every child it started have exited (the children inherit the descriptor). The kernel drops
    the lock when the last holder dies, so there is no stale-lock cleanup to get wrong; the pid
    written inside is only for the message.
    """

    def __init__(self, data_dir: Path):
        self.path = data_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            recorded = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SystemExit(f"lmstack serve: {self.path.parent} is in use by another lmstack serve "
                             f"(pid {recorded}{self._holders_note(recorded)}); stop it, or pass --data-dir "
                             "to use another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.set_inheritable(fd, True)
        self.fd = fd

    def _holders_note(self, recorded: str) -> str:
        """When the recorded supervisor is gone, the children still holding the lock, by pid."""
        if recorded.isdigit() and Path(f"/proc/{recorded}").exists():
            return ""
        holders = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(self.path) for fd in os.listdir(f"/proc/{pid}/fd")):
                    holders.append(pid)
            except OSError:
                continue
        return f", no longer running; its children still hold the directory: pids {', '.join(holders)}" \
            if holders else ""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_ports(args) -> None:
    """Every port ``lmstack serve`` will bind, checked before anything starts (one line if taken)."""
    from services.ports import PortInUse, check_port_free

    wanted = [(args.inference_port, "inference gRPC", "--inference-port"),
              (args.tokenizer_port, "tokenizer gRPC", "--tokenizer-port")]
    if args.http_port:
        wanted.append((args.http_port, "OpenAI-compatible HTTP", "--http-port"))
    if not args.no_finetune:
        wanted.append((args.finetune_port, "fine-tuning gRPC", "--finetune-port"))
        if args.redis_port:
            wanted.append((args.redis_port, "private Redis", "--redis-port"))
    if args.metrics_port:
        names = ["inference", "tokenizer"] + ([] if args.no_finetune else ["fine-tuning API", "worker"])
        wanted += [(args.metrics_port + i, f"{n} metrics", "--metrics-port (the first of consecutive ports)")
                   for i, n in enumerate(names)]
    seen: dict[int, str] = {}
    for port, what, flag in wanted:
        if port in seen:
            raise SystemExit(f"lmstack serve: port {port} is given to both {seen[port]} and {what}; change {flag}")
        seen[port] = what
        try:
            check_port_free(what, args.host, port, hint=f"stop that process or choose another port with {flag}")
        except (PortInUse, ValueError) as e:
            raise SystemExit(f"lmstack serve: {e}") from None


def check_quantize(items: list[str]) -> None:
    """``--quantize`` values, checked before anything starts (lmcore names the quantizations it has)."""
    from lmcore.model.quantize import QUANTIZATIONS

    for item in items:
        kind = item.rpartition("=")[2]
        if kind not in QUANTIZATIONS:
            raise SystemExit(f"lmstack serve: --quantize {item!r}: unknown quantization {kind!r}; "
                             f"use one of {list(QUANTIZATIONS)} (or NAME=int8 for one model)")


def cli_hint() -> str:
    """How to reach the ``lmstack`` CLI from the caller's shell (``make serve`` does not activate .venv)."""
    bin_dir = Path(sys.executable).parent
    exe = bin_dir / "lmstack"
    if shutil.which("lmstack") == str(exe):
        return "CLI: lmstack --help"
    try:
        shown = exe.relative_to(Path.cwd())
    except ValueError:
        shown = exe
    activate = bin_dir / "activate"
    try:
        activate = activate.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"CLI: {shown} --help   (or run `source {activate}` once, then `lmstack ...`)"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_arg(models: list[str]) -> str:
    if not models:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise SystemExit(f"lmstack: the default model is missing ({DEFAULT_MODEL_DIR}); pass --model PATH")
        return f"pycode={DEFAULT_MODEL_DIR}"
    out = []
    for m in models:
        name, sep, path = m.partition("=")
        path = path if sep else name
        if not Path(path).expanduser().is_dir():
            raise SystemExit(f"lmstack: model directory not found: {path}")
        out.append(f"{name}={Path(path).expanduser().resolve()}" if sep else str(Path(path).expanduser().resolve()))
    return ",".join(out)


def _draft_arg(item: str) -> str:
    target, sep, path = item.partition("=")
    if not sep or not Path(path).expanduser().is_dir():
        raise SystemExit(f"lmstack: --draft-model {item!r}: give TARGET=PATH with PATH a model directory")
    return f"{target}={Path(path).expanduser().resolve()}"


REDIS_PASSWORD_FILE = "redis.password"


def redis_config(data: Path, port: int) -> Path:
    """The private Redis's config: loopback only, protected mode, append-only, and a password
    (``requirepass``) generated once into ``<data-dir>/redis.password`` (mode 0600). The password
    goes into a config file, not onto the command line, where ``ps`` would show it."""
    import secrets

    (data / "redis").mkdir(exist_ok=True)
    pw_file = data / REDIS_PASSWORD_FILE
    if not pw_file.is_file() or not pw_file.read_text().strip():
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")
    password = pw_file.read_text().strip()
    conf = data / "redis" / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {data / 'redis'}\nappendonly yes\n"
                f'save ""\nrequirepass {password}\n')
    return conf


def keys_file_of(args, data: Path) -> str:
    """--api-keys-file, else ``<data-dir>/api-keys.yaml`` when ``lmstack keys create`` made one there."""
    if args.api_keys_file:
        return str(Path(args.api_keys_file).expanduser().resolve())
    default = data / "api-keys.yaml"
    return str(default) if default.is_file() else ""


def check_exposure(args, data: Path) -> None:
    """The servers' own rule (``services.tls``), checked before anything starts."""
    from services.tls import check_exposure as check

    try:
        check(args.host, bool(args.api_key or keys_file_of(args, data)), bool(args.tls_cert and args.tls_key),
              args.insecure, "platform")
    except ValueError as e:
        raise SystemExit(f"lmstack serve: {e}") from None


def finetune_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("services.finetune") is not None


def plan(args) -> tuple[list[Child], str | None]:
    """The children to run, in start order, and the Redis URL the fine-tuning parts use."""
    if not finetune_available():
        args.no_finetune = True
    data = Path(args.data_dir).expanduser().resolve()
    store = data / "models"
    store.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    metrics = (lambda i: args.metrics_port + i) if args.metrics_port else (lambda i: 0)
    common = {"LMSTACK_HOST": args.host, "LMSTACK_MODEL_STORE": str(store)}
    if args.api_key:
        common["LMSTACK_API_KEYS"] = ",".join(args.api_key)
    keys_file = keys_file_of(args, data)
    if keys_file:
        common["LMSTACK_API_KEYS_FILE"] = keys_file
    for flag, env in (("tls_cert", "LMSTACK_TLS_CERT"), ("tls_key", "LMSTACK_TLS_KEY"),
                      ("tls_client_ca", "LMSTACK_TLS_CLIENT_CA")):
        if getattr(args, flag):
            common[env] = str(Path(getattr(args, flag)).expanduser().resolve())
    if args.insecure:
        common["LMSTACK_INSECURE"] = "true"
    models = _model_arg(args.model)
    children: list[Child] = []
    redis_url = None
    if not args.no_finetune:
        redis_url = os.environ.get("LMSTACK_REDIS_URL")
        if not redis_url:
            if shutil.which("redis-server") is None:
                raise SystemExit(
                    "lmstack: fine-tuning needs Redis. Set LMSTACK_REDIS_URL=redis://host:port/0, install "
                    "redis-server (apt install redis-server / brew install redis), or pass --no-finetune."
                )
            port = args.redis_port or _free_port()
            conf = redis_config(data, port)
            children.append(Child("redis", ["redis-server", str(conf)], {}, endpoint="",
                                  label=f"redis 127.0.0.1:{port} (password: {data / REDIS_PASSWORD_FILE})"))
            redis_url = f"redis://127.0.0.1:{port}/0"
            common["LMSTACK_REDIS_PASSWORD_FILE"] = str(data / REDIS_PASSWORD_FILE)  # never in a URL or a log
        common["LMSTACK_REDIS_URL"] = redis_url
        common["LMSTACK_DATA_DIR"] = str(data)
    children.append(Child("tokenizer", [py, "-m", "services.tokenizer"], {
        **common, "LMSTACK_PORT": str(args.tokenizer_port), "LMSTACK_METRICS_PORT": str(metrics(1)),
        "LMSTACK_MODELS": models}, f"{args.host}:{args.tokenizer_port}", metrics_port=metrics(1)))
    children.append(Child("inference", [py, "-m", "services.inference"], {
        **common, "LMSTACK_PORT": str(args.inference_port), "LMSTACK_METRICS_PORT": str(metrics(0)),
        "LMSTACK_MODELS": models, "LMSTACK_MAX_BATCH_SIZE": str(args.max_batch_size),
        **({"LMSTACK_QUANTIZE": ",".join(args.quantize)} if args.quantize else {}),
        "LMSTACK_HTTP_PORT": str(args.http_port),
        **({"LMSTACK_SPECULATION": args.speculation} if args.speculation else {}),
        **({"LMSTACK_SPECULATIVE_TOKENS": str(args.speculative_tokens)} if args.speculative_tokens else {}),
        **({"LMSTACK_DRAFT_MODELS": ",".join(_draft_arg(d) for d in args.draft_model)} if args.draft_model else {})},
        f"{args.host}:{args.inference_port}", metrics_port=metrics(0),
        http_url=f"{'https' if args.tls_cert else 'http'}://{args.host}:{args.http_port}/v1" if args.http_port else ""))
    if not args.no_finetune:
        children.append(Child("finetune", [py, "-m", "services.finetune"], {
            **common, "LMSTACK_PORT": str(args.finetune_port), "LMSTACK_METRICS_PORT": str(metrics(2)),
            "LMSTACK_MODELS": models}, f"{args.host}:{args.finetune_port}", metrics_port=metrics(2)))
        children.append(Child("worker", [py, "-m", "services.finetune.worker"], {
            **common, "LMSTACK_METRICS_PORT": str(metrics(3)), "LMSTACK_MODELS": models}, "", metrics_port=metrics(3)))
    return children, redis_url


def _serving(endpoint: str, tls: dict | None = None) -> bool:
    """Health SERVING at ``endpoint``; ``tls``: {ca, cert, key, client_ca} of the servers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        if tls and tls.get("cert"):
            from services.tls import channel_credentials

            mtls = bool(tls.get("client_ca"))  # present the servers' own certificate
            creds = channel_credentials(tls.get("ca") or tls["cert"], tls["cert"] if mtls else "",
                                        tls["key"] if mtls else "")
            host, _, port = endpoint.rpartition(":")
            target = f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
            ch = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")])
        else:
            ch = grpc.insecure_channel(endpoint)
        with ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class Supervisor:
    def __init__(self, children: list[Child], log_dir: Path, grace_s: float = 15.0, keep_fds: tuple[int, ...] = (),
                 tls: dict | None = None):
        self.tls = tls  # the servers' TLS files: the readiness check speaks TLS too
        self.children = children
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.keep_fds = keep_fds  # the data directory's lock, held by every child too
        self.stopping = False

    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            for child in self.children:
                child.start(self.log_dir, self.keep_fds)
            if not self._wait_ready():
                return 1
            self._print_endpoints()
            return self._watch()
        finally:
            self.stop_all()

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = [c for c in self.children if c.endpoint]
        while pending and not self.stopping:
            for child in list(pending):
                if not child.alive():
                    print(f"lmstack: {child.name} exited with code {child.proc.returncode} while starting; "
                          f"see {self.log_dir / (child.name + '.log')}", file=sys.stderr)
                    return False
                if _serving(child.endpoint, self.tls):
                    pending.remove(child)
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                print(f"lmstack: {names} not ready after {READY_TIMEOUT_S:.0f}s; logs in {self.log_dir}",
                      file=sys.stderr)
                return False
            time.sleep(0.2)
        return not self.stopping

    def _print_endpoints(self) -> None:
        print("lmstack is serving:", flush=True)
        for c in self.children:
            where = f"grpc {c.endpoint}" if c.endpoint else (c.label or "-")
            metrics = f"  metrics http://{c.endpoint.split(':')[0] or '127.0.0.1'}:{c.metrics_port}/metrics" \
                if c.metrics_port else ""
            print(f"  {c.name:<10} {where}{metrics}  (pid {c.proc.pid})", flush=True)
            if c.http_url:
                print(f"  {'openai':<10} {c.http_url}", flush=True)
        print(f"logs: {self.log_dir}   Ctrl-C stops everything", flush=True)
        print(cli_hint(), flush=True)

    def _watch(self) -> int:
        while not self.stopping:
            for child in self.children:
                if self.stopping or child.alive():
                    continue
                code = child.proc.returncode
                now = time.monotonic()
                child.crashes = [t for t in child.crashes if now - t < RESTART_WINDOW_S] + [now]
                log = self.log_dir / f"{child.name}.log"
                if len(child.crashes) > MAX_RESTARTS:
                    print(f"lmstack: {child.name} crashed {len(child.crashes)} times in "
                          f"{RESTART_WINDOW_S:.0f}s (last exit code {code}); stopping everything. See {log}",
                          file=sys.stderr, flush=True)
                    return 1
                print(f"lmstack: {child.name} exited with code {code}; restarting (see {log})",
                      file=sys.stderr, flush=True)
                time.sleep(0.5 * len(child.crashes))
                child.start(self.log_dir, self.keep_fds)
            time.sleep(0.2)
        return 0

    def stop_all(self) -> None:
        # Services and workers first (they drain, checkpoint and requeue through Redis), Redis last.
        services = [c for c in self.children if c.name != "redis"]
        for group in (services, [c for c in self.children if c.name == "redis"]):
            for child in group:
                child.terminate()
            deadline = time.monotonic() + self.grace_s
            for child in group:
                while child.alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                child.kill()
        print("lmstack: stopped", flush=True)


def run(args) -> int:
    data = Path(args.data_dir).expanduser().resolve()
    data.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data)
    lock.acquire()  # before the port check: a second serve on this directory is named as such
    try:
        if not finetune_available():
            args.no_finetune = True
        check_quantize(args.quantize)
        check_exposure(args, data)
        check_ports(args)
        children, _ = plan(args)
        log_dir = data / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        tls = {"cert": args.tls_cert, "key": args.tls_key, "ca": args.tls_ca, "client_ca": args.tls_client_ca}
        return Supervisor(children, log_dir, keep_fds=(lock.fd,), tls=tls).run()
    finally:
        lock.release()
