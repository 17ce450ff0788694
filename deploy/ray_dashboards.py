"""The Ray variants of the Grafana dashboards, generated from the standalone ones.

``deploy/grafana/dashboards/lmstack.json`` and ``lmstack-training.json`` chart ``lmstack serve``
(and docker-compose); on Ray (``deploy/serve.yaml``) the same metrics arrive through Ray's metrics
export (``deploy/ray_metrics.py``), so the Ray variants in ``deploy/grafana/dashboards/ray/`` are
the standalone dashboards rewritten by three rules, plus a row of Serve's own metrics:

1. every lmstack metric gains Ray's ``ray_`` prefix (``lmstack_inference_generation_tokens_total``
   -> ``ray_lmstack_inference_generation_tokens_total``); the series are per replica, and the
   panels already aggregate (``sum by (model)``), so most queries change in nothing else;
2. the job-store gauges (``lmstack_finetune_jobs``, ..., and each running job's
   ``lmstack_finetune_job_*{job_id}``) are exported by every ``FineTuning`` replica, each reading
   the same Redis, so their ``sum`` becomes ``max`` and a running job's series is its
   ``max by (job_id)``;
3. the panels built on what Ray replaces are rewritten (``RAY_PANELS``, by title): the
   ``lmstack_<component>_rpc_*`` RPC metrics become Serve's gRPC proxy metrics
   (``ray_serve_num_grpc_requests_total{method,status_code}``, ``ray_serve_grpc_request_latency_ms``),
   and ``up`` of a service becomes Serve's replica health.

``python -m deploy.ray_dashboards`` rewrites the Ray variants; ``--check`` exits 1 when the
committed files differ from what the standalone dashboards generate (``tests/deploy`` runs it), so
a panel added to a standalone dashboard cannot be forgotten on Ray.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parent / "grafana" / "dashboards"
RAY_DIR = DASHBOARDS / "ray"
SOURCES = ("lmstack.json", "lmstack-training.json")  # each -> ray/<stem>-ray.json, uid <uid>-ray
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# Gauges read from the job store (services/finetune/metrics.py): every FineTuning replica exports the
# same values. The store-wide ones are aggregated in the standalone panels; the running-job ones
# (label job_id) are charted bare there.
JOB_STORE_GAUGES = ("lmstack_finetune_jobs", "lmstack_finetune_oldest_queued_job_age_seconds",
                    "lmstack_finetune_workers_alive", "lmstack_finetune_job_store_up")
RUNNING_JOB_GAUGES = ("lmstack_finetune_job_step", "lmstack_finetune_job_total_steps",
                      "lmstack_finetune_job_train_loss", "lmstack_finetune_job_eval_loss",
                      "lmstack_finetune_job_learning_rate", "lmstack_finetune_job_tokens_per_second")

_LMSTACK_NAME = re.compile(r"(?<![A-Za-z0-9_:])lmstack_")
_SUM_OF_STORE_GAUGE = re.compile(r"\bsum(\s+by\s*\([^)]*\))?(\s*)\((ray_(?:" + "|".join(JOB_STORE_GAUGES) + r")\b)")
_RUNNING_JOB_GAUGE = re.compile(r"\b(ray_(?:" + "|".join(RUNNING_JOB_GAUGES) + r")\b(?:\{[^}]*\})?)")


def ray_expr(expr: str) -> str:
    """Rules 1 and 2: a standalone query as it reads on Ray."""
    expr = _LMSTACK_NAME.sub("ray_lmstack_", expr)
    expr = _SUM_OF_STORE_GAUGE.sub(lambda m: f"max{m.group(1) or ''}{m.group(2)}({m.group(3)}", expr)
    return _RUNNING_JOB_GAUGE.sub(r"max by (job_id) (\1)", expr)


# --- rule 3: the panels Ray changes ---------------------------------------------------------------
def grpc_method(service: str) -> str:
    return f'method=~"/lmstack.v1.{service}/.*"'


SERVER_SIDE = 'status_code=~"INTERNAL|UNKNOWN|DATA_LOSS|UNAVAILABLE"'


def _by_service(selector: str) -> str:
    """Serve's gRPC proxy requests per second, labelled with the lmstack service of their method."""
    selector = f"{{{selector}}}" if selector else ""
    return (f"sum by (service) (label_replace(rate(ray_serve_num_grpc_requests_total{selector}[$__rate_interval]), "
            '"service", "$1", "method", "/lmstack[.]v1[.]([A-Za-z]+)/.*"))')


def _p(quantile: float, bucket: str, by: str, selector: str = "", scale: str = "") -> str:
    return (f"histogram_quantile({quantile}, sum by (le, {by}) (rate({bucket}{{{selector}}}[$__rate_interval])))"
            f"{scale}")


RAY_PANELS = {
    # lmstack serving
    "Requests / s by status": dict(
        description="Inference RPCs per second through Serve's gRPC proxy, by method and gRPC status code. "
                    "INVALID_ARGUMENT and NOT_FOUND are client mistakes; INTERNAL, UNKNOWN, UNAVAILABLE are ours.",
        targets=[(f"sum by (method, status_code) (rate(ray_serve_num_grpc_requests_total{{{grpc_method('InferenceService')}}}"
                  "[$__rate_interval]))", "{{method}} {{status_code}}")]),
    "Server-side error ratio": dict(
        description="Share of RPCs per service (at Serve's gRPC proxy) that ended with a server-side code "
                    "(INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE); client mistakes are excluded.",
        targets=[(f"({_by_service(SERVER_SIDE)} or 0 * {_by_service('')}) / {_by_service('')}", "{{service}}")]),
    "Services up": dict(
        title="Replicas healthy and nodes scraped",
        description="Healthy replicas of each Serve deployment (Serve's health checks: a model still loading, "
                    "a dead engine thread or worker loop fail them), and 1 for each Ray node whose metrics "
                    "export Prometheus can scrape.",
        targets=[("sum by (deployment) (ray_serve_deployment_replica_healthy{application=~\"$application\"})",
                  "{{deployment}} healthy replicas"),
                 ('up{job="ray"}', "node {{instance}}")]),
    "Tokenizer RPC latency p99": dict(
        description="99th percentile latency of the tokenizer's RPCs, by method, at Serve's gRPC proxy (the "
                    "proxy and Gateway hops included).",
        targets=[(_p(0.99, "ray_serve_grpc_request_latency_ms_bucket", "method", grpc_method("TokenizerService"),
                     " / 1000"), "{{method}}")]),
    "Fine-tuning RPCs / s by status": dict(
        description="Fine-tuning API RPCs per second through Serve's gRPC proxy, by method and status code "
                    "(the training dashboard has the jobs).",
        targets=[(f"sum by (method, status_code) (rate(ray_serve_num_grpc_requests_total{{{grpc_method('FineTuningService')}}}"
                  "[$__rate_interval]))", "{{method}} {{status_code}}")]),
    # lmstack training
    "Queued jobs and workers alive": dict(
        description="Jobs waiting for a worker, workers the queue heard from within reclaim_idle_s, and healthy "
                    "FineTuneWorker replicas. Queued jobs with no worker alive: alert LmstackFinetuneNoWorker.",
        targets=[('max(ray_lmstack_finetune_jobs{status="queued"})', "queued jobs"),
                 ("max(ray_lmstack_finetune_workers_alive)", "workers alive (queue)"),
                 ('sum(ray_serve_deployment_replica_healthy{deployment="FineTuneWorker"})', "worker replicas healthy")]),
}

# The row of Serve's own metrics appended to the serving dashboard: (title, unit, description, targets);
# a target is (expr, legend) or (expr, legend, RIGHT_AXIS_SECONDS) for a latency beside request rates.
RIGHT_AXIS_SECONDS = [{"id": "unit", "value": "s"}, {"id": "custom.axisPlacement", "value": "right"}]
APP = 'application=~"$application"'
SERVE_ROW = ("Ray Serve", [
    ("Serve requests / s by deployment", "reqps",
     "Requests each Serve deployment's replicas handled per second (Serve's ray_serve_deployment_request_counter; "
     "the Gateway receives every RPC, then calls Inference, Tokenizer or FineTuning).",
     [(f"sum by (deployment) (rate(ray_serve_deployment_request_counter_total{{{APP}}}[$__rate_interval]))",
       "{{deployment}}")]),
    ("Serve errors / s by deployment", "reqps",
     "Requests per second that raised in a deployment's replica, by exception type. Client mistakes count "
     "here too (RpcFailed carries every gRPC status): see Requests / s by status for the codes.",
     [(f"sum by (deployment, exception_type) (rate(ray_serve_deployment_error_counter_total{{{APP}}}"
       "[$__rate_interval]))", "{{deployment}} {{exception_type}}")]),
    ("Serve processing latency by deployment (p50, p99)", "s",
     "Time a deployment's replica spent on a request (a stream: until its last chunk), by deployment.",
     [(_p(0.5, "ray_serve_deployment_processing_latency_ms_bucket", "deployment", APP, " / 1000"),
       "p50 {{deployment}}"),
      (_p(0.99, "ray_serve_deployment_processing_latency_ms_bucket", "deployment", APP, " / 1000"),
       "p99 {{deployment}}")]),
    ("Replicas per deployment (running, autoscaling target)", "short",
     "Healthy replicas of each deployment and the number Serve's autoscaler aims for (Inference and Tokenizer "
     "scale between min_replicas and max_replicas on their ongoing requests).",
     [(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "running {{deployment}}"),
      (f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{APP}}})", "target {{deployment}}")]),
    ("Ongoing requests per deployment", "short",
     "Requests running in each deployment's replicas, and those its callers queued waiting for a replica "
     "(max_ongoing_requests reached). Inference's autoscaler targets target_ongoing_requests per replica.",
     [(f"sum by (deployment) (ray_serve_replica_processing_queries{{{APP}}})", "running {{deployment}}"),
      (f"sum by (deployment) (ray_serve_deployment_queued_queries{{{APP}}})", "queued {{deployment}}")]),
    ("gRPC proxy requests / s and p99 latency", "reqps",
     "Every RPC through Serve's gRPC proxy per second, and the proxy's p99 latency per call (right axis, "
     "seconds): the end-to-end view a client has.",
     [(f"sum(rate(ray_serve_num_grpc_requests_total{{{APP}}}[$__rate_interval]))", "requests / s"),
      (_p(0.99, "ray_serve_grpc_request_latency_ms_bucket", "application", APP, " / 1000"), "p99 latency (s)",
       RIGHT_AXIS_SECONDS)]),
])

APPLICATION_VARIABLE = {
    "name": "application", "label": "Serve application", "type": "query", "datasource": DATASOURCE,
    "query": {"query": "label_values(ray_serve_deployment_replica_healthy, application)", "refId": "application"},
    "definition": "label_values(ray_serve_deployment_replica_healthy, application)", "includeAll": True,
    "multi": True, "allValue": ".*", "refresh": 2,
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
}


def _targets(pairs) -> list[dict]:
    return [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend, *_) in enumerate(pairs)]


def ray_panel(panel: dict) -> dict:
    panel = copy.deepcopy(panel)
    change = RAY_PANELS.get(panel["title"])
    if change is not None:
        panel["title"] = change.get("title", panel["title"])
        panel["description"] = change["description"]
        panel["targets"] = _targets(change["targets"])
    else:
        for t in panel.get("targets", []):
            t["expr"] = ray_expr(t["expr"])
    for inner in panel.get("panels", []):
        inner.update(ray_panel(inner))
    return panel


def serve_row(first_id: int, y: int) -> list[dict]:
    title, panels = SERVE_ROW
    out = [{"id": first_id, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}]
    for i, (name, unit, description, targets) in enumerate(panels):
        overrides = [{"matcher": {"id": "byFrameRefID", "options": chr(ord("A") + j)}, "properties": target[2]}
                     for j, target in enumerate(targets) if len(target) > 2]
        out.append({"id": first_id + 1 + i, "type": "timeseries", "title": name, "description": description,
                    "datasource": DATASOURCE,
                    "gridPos": {"x": 12 * (i % 2), "y": y + 1 + 8 * (i // 2), "w": 12, "h": 8},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": overrides}, "targets": _targets(targets)})
    return out


def ray_uid(uid: str) -> str:
    return f"{uid}-ray"


def ray_dashboard(source: dict) -> dict:
    """The Ray variant of a standalone dashboard."""
    dash = copy.deepcopy(source)
    dash["uid"] = ray_uid(source["uid"])
    dash["title"] = f"{source['title']} (Ray)"
    dash["description"] = (f"{source['description']} This is the Ray Serve variant (deploy/serve.yaml, metrics "
                           "through Ray's export, generated by deploy/ray_dashboards.py).")
    dash["tags"] = [*source.get("tags", []), "ray"]
    dash["links"] = [{**link, "title": f"{link['title']} (Ray)", "url": f"{link['url']}-ray"}
                     for link in source.get("links", [])]
    for var in dash.get("templating", {}).get("list", []):
        var["query"]["query"] = ray_expr(var["query"]["query"])
        var["definition"] = ray_expr(var["definition"])
    dash["panels"] = [ray_panel(p) for p in source["panels"]]
    if source["uid"] == "lmstack":  # the serving dashboard gains Serve's own row
        dash["panels"] += serve_row(max(p["id"] for p in dash["panels"]) + 1,
                                    max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dash["panels"]))
        dash.setdefault("templating", {"list": []})["list"].append(APPLICATION_VARIABLE)
    return dash


def render(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def generated() -> dict[Path, str]:
    """Each Ray variant's path and the text it should have."""
    out = {}
    for name in SOURCES:
        source = json.loads((DASHBOARDS / name).read_text())
        out[RAY_DIR / f"{Path(name).stem}-ray.json"] = render(ray_dashboard(source))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = [path for path, text in generated().items() if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(DASHBOARDS.parent.parent.parent)} is out of date: run "
                  "python -m deploy.ray_dashboards", file=sys.stderr)
        return 1 if stale else 0
    RAY_DIR.mkdir(exist_ok=True)
    for path, text in generated().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
