"""deploy/prometheus and deploy/grafana, checked by the real tools: promtool (config, rules, rule unit
tests) and the dashboards' shape (each panel described, with a unit, on the provisioned datasource).

That every dashboard query returns data, and that an alert fires for real, is shown against a live
Prometheus in ``test_observability.py``.
"""

from __future__ import annotations

import json
import subprocess

import yaml

from tests.helpers import ROOT
from tests.helpers.prometheus import dashboard_targets, prometheus_binary

PROM = ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))


def promtool(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([prometheus_binary("promtool"), *args], capture_output=True, text=True, cwd=PROM)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_prometheus_config_is_valid_and_loads_the_alert_rules():
    out = promtool("check", "config", "prometheus.yml")
    assert "alerts.yml" in out.stdout + out.stderr
    assert yaml.safe_load((PROM / "prometheus.yml").read_text())["rule_files"] == ["alerts.yml"]


def test_alert_rules_are_valid():
    promtool("check", "rules", "alerts.yml")


def test_alert_rule_unit_tests_pass():
    promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_firing_and_a_silent_case():
    rules = [r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    fired, silent = set(), set()
    for case in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(rules) <= fired, f"never shown firing: {sorted(set(rules) - fired)}"
    assert set(rules) <= silent, f"never shown silent: {sorted(set(rules) - silent)}"
    for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_alerts_are_documented():
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for r in g["rules"]:
            assert f"`{r['alert']}`" in doc, f"docs/monitoring.md does not explain {r['alert']}"


def test_dashboards_are_provisioned_with_described_panels_on_the_provisioned_datasource():
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/lmstack.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert {p.stem for p in DASHBOARDS} >= {"lmstack", "lmstack-training"}
    uids = set()
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] not in uids, f"{path.name}: duplicate dashboard uid"
        uids.add(dash["uid"])
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        panels = [p for p in dash["panels"] if p["type"] != "row"]
        assert panels, path.name
        for p in panels:
            where = f"{path.name}: panel {p['title']!r}"
            assert p.get("description", "").strip(), f"{where} has no description"
            assert p["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
            assert p["datasource"] == {"type": "prometheus", "uid": uid}, where
            assert p.get("targets"), f"{where} has no query"
        for panel, target in dashboard_targets(dash):
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]
            assert target["expr"].strip(), panel["title"]
        refs = [t["refId"] for p in panels for t in p["targets"]]
        assert all(refs), path.name


def test_docs_describe_every_dashboard_panel_as_grafana_does():
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    for path in DASHBOARDS:
        for p in json.loads(path.read_text())["panels"]:
            if p["type"] != "row":
                row = f"| {p['title']} | {p['description']} |"
                assert row in doc, f"docs/monitoring.md lacks the row {row!r} ({path.name})"
