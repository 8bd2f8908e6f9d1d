"""The shipped Grafana dashboard is valid JSON whose queries name metrics the code really exports."""

from __future__ import annotations

import json
import re

from common.runtime import REPO_ROOT

SOURCES = ["deployments/observability.py", "billing/metrics.py", "training/loop.py"]


def _defined_metric_names() -> set[str]:
    text = "\n".join((REPO_ROOT / p).read_text() for p in SOURCES)
    names = set(re.findall(r'\(\s*f?"(maas_[a-z_]+)"', text))
    names |= {f"maas_train_{n}" for n in ("loss", "tokens_per_second", "step")}  # built in a loop in training/loop.py
    return names


def test_dashboard_queries_use_exported_metric_names():
    dash = json.loads((REPO_ROOT / "cluster/grafana/ray-maas-dashboard.json").read_text())
    assert dash["uid"] == "ray-maas" and dash["panels"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    defined = _defined_metric_names()
    assert {"maas_requests", "maas_time_to_first_token_seconds", "maas_queue_wait_seconds", "maas_billing_ledger_lag_seconds"} <= defined
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"ray_(maas_[a-z_]+)", target["expr"]):
                used.add(re.sub(r"_(total|bucket|sum|count)$", "", metric))
    assert used and used <= defined, used - defined
    # Request, latency, queue, token, rejection and billing-lag panels are all there.
    assert {"maas_requests", "maas_tokens", "maas_time_to_first_token_seconds", "maas_inter_token_latency_seconds", "maas_queue_wait_seconds", "maas_requests_rejected", "maas_billing_ledger_lag_seconds"} <= used
