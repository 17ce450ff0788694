"""A real Prometheus for the tests: Debian's ``prometheus`` package (server + ``promtool``).

``prometheus_binary(name)`` finds ``prometheus`` or ``promtool``: on a machine without them the test
skips, saying how to install them; under CI (``CI=true``) a missing binary fails instead, because
``.ci/run`` installs the package. ``PrometheusServer`` runs one on a free port with a generated
config (given scrape targets, a short scrape and evaluation interval, optional rule files) and
answers through the HTTP API (``/api/v1/query``, ``query_range``, ``alerts``).

Dashboards: ``dashboard_targets`` yields every PromQL target of a Grafana dashboard JSON, and
``substitute`` replaces Grafana's variables (``$__rate_interval``, ``$__interval``, ``$__range``
and the dashboard's own template variables, set to "All") the way Grafana would before sending
the query.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port

INSTALL_HINT = "install Debian's prometheus package: apt-get install prometheus (server + promtool)"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def prometheus_binary(name: str = "prometheus") -> str:
    """Path of ``prometheus`` / ``promtool``; skips without it (fails under CI=true)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: {INSTALL_HINT}"
        if in_ci():
            pytest.fail(f"{message} (CI=true: .ci/run installs it when run as root)")
        pytest.skip(message)
    return path


class PrometheusServer:
    """``prometheus`` on 127.0.0.1:<free port>, scraping ``jobs`` ({job name: [host:port, ...]})."""

    def __init__(self, workdir: Path, jobs: dict[str, list[str]], rule_files: list[Path] = (),
                 interval: str = "1s"):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in jobs.items()],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        subprocess.run([prometheus_binary("promtool"), "check", "config", str(self.config)], check=True,
                       capture_output=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [prometheus_binary("prometheus"), f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def wait_for(self, expr: str, timeout: float = 120.0) -> list[dict]:
        """Poll an instant query until it returns a series; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {expr!r} after {timeout}s")
            time.sleep(0.5)


# --- Grafana dashboards ----------------------------------------------------------------------------
def dashboard_targets(dashboard: dict):
    """``(panel, target)`` for every PromQL target of every panel (rows' nested panels included)."""
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner, target


def substitute(expr: str, dashboard: dict, rate_interval: str, range_: str) -> str:
    """The query Grafana would send: its interval variables, and each template variable as "All"."""
    for var in dashboard.get("templating", {}).get("list", []):
        expr = re.sub(rf"\${{?{re.escape(var['name'])}\b}}?", var.get("allValue") or ".*", expr)
    return (expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
            .replace("$__range", range_))
