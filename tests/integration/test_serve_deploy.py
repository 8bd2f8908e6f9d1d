"""The second start path: Serve's own `serve deploy` with the Serve config file the project generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import local
from cluster.serve_config import serve_config_for
from common.runtime import REPO_ROOT, free_port

pytestmark = pytest.mark.integration


def test_serve_deploy_of_the_generated_config_serves_the_model(maas_config, tmp_path):
    from openai import OpenAI

    dashboard_port = free_port()
    local.start_ray(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_port=dashboard_port)
    try:
        from cluster.versions import planned_versions

        config = serve_config_for(maas_config, versions=planned_versions(maas_config))
        assert [a["name"] for a in config["applications"]] == [f"maas--{maas_config.model.name}--v1", "maas--all-MiniLM-L6-v2--v1", "maas"]
        assert config["http_options"]["port"] == maas_config.http.port
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        serve_cli = Path(sys.executable).with_name("serve")
        subprocess.run([str(serve_cli), "deploy", str(path), "--address", f"http://127.0.0.1:{dashboard_port}"], cwd=REPO_ROOT, check=True, timeout=120)
        base = f"http://127.0.0.1:{maas_config.http.port}"
        local.wait_healthy(base, timeout_s=600)
        from billing import actor
        from tests.integration.conftest import create_key

        key, _ = create_key(actor.get(maas_config.billing), "deploy-test")
        client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
        resp = client.chat.completions.create(model=maas_config.model.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert resp.usage.completion_tokens >= 1 and resp.choices[0].message.content
    finally:
        local.stop()
