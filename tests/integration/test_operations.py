"""The operator's path, tried as a new user would: `maas up` → traffic → `maas status` / keys / audit → `maas down`.

One real head started by `maas up` (its own ports, state folder and ledger) serves the module. On it:
the metrics names reach Ray's endpoint, one request's id appears in the JSON logs of every stage, no
key secret appears in any log file of the session, and admin actions land in the audit log.
`maas down` must leave no process of that Ray session behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from common.runtime import REPO_ROOT, free_port


MAAS = str(Path(sys.executable).with_name("maas"))
STAGES = ("ingress", "tokenizer", "generator", "billing")  # the ingress writes responses itself (deployments.inline_postprocess)


def _wait_for(predicate, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    state = tmp_path_factory.mktemp("maas-state")
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MAAS_PORT", "MAAS_HOST")}
    e.update(MAAS_STATE_DIR=str(state), MAAS_LEDGER_URL=f"sqlite:///{state}/ledger.db", HF_HUB_OFFLINE="1")
    return e


def maas(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([MAAS, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def up(env):
    ports = {"api": free_port(), "dashboard": free_port(), "metrics": free_port()}
    t0 = time.monotonic()
    result = maas(env, "up", "--port", str(ports["api"]), "--dashboard-port", str(ports["dashboard"]), "--metrics-port", str(ports["metrics"]), timeout=600)
    state_file = Path(env["MAAS_STATE_DIR"]) / "up.json"
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        url = re.search(r"serving \S+ at (http://\S+/v1)", out).group(1)
        key = re.search(r"shown only now:\n\s+(sk-maas-\S+)", out).group(1)
        admin = re.search(r"Admin key for /admin/\*:\n\s+(sk-maas-\S+)", out).group(1)
        assert f"http://127.0.0.1:{ports['dashboard']}" in out and f"127.0.0.1:{ports['metrics']}/metrics" in out
        yield {"url": url, "key": key, "admin": admin, "ports": ports, "state": json.loads(state_file.read_text()), "up_s": time.monotonic() - t0}
    finally:
        if state_file.exists():  # stop what this module started, whatever happened
            maas(env, "down", timeout=180)


def _client(up, key=None):
    from openai import OpenAI

    return OpenAI(base_url=up["url"], api_key=key or up["key"], max_retries=0, timeout=120)


def test_the_dashboards_job_api_needs_rays_token(up, env):
    """Issue 24, item 11: any local user could POST a job to 127.0.0.1:8265 and run code as the service."""
    import urllib.error

    jobs = f"http://127.0.0.1:{up['ports']['dashboard']}/api/jobs/"
    submit = urllib.request.Request(jobs, data=json.dumps({"entrypoint": "echo pwned"}).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(submit, timeout=10)
    assert refused.value.code == 401
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert oct(Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777) == "0o600"
    with urllib.request.urlopen(urllib.request.Request(jobs, headers={"Authorization": f"Bearer {token}"}), timeout=10) as listing:
        assert listing.status == 200


def test_up_prints_a_working_url_and_key(up):
    reply = _client(up).chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert reply.system_fingerprint == "SmolLM2-135M-Instruct@v1"


def test_status_shows_every_deployment_running(up, env):
    result = maas(env, "status")
    assert result.returncode == 0, result.stderr
    for deployment in ("Ingress", "Tokenizer", "Generator"):
        assert re.search(rf"{deployment}\s+HEALTHY\s+RUNNING 1", result.stdout), result.stdout
    assert "maas--SmolLM2-135M-Instruct--v1" in result.stdout and up["url"] in result.stdout and "v1 100%" in result.stdout


def test_one_request_id_is_in_the_logs_of_every_stage(up):
    """Every stage a request crossed logs its id: a short prompt is tokenized by the ingress itself
    (`deployments.inline_tokenize_chars`), a long one by the tokenizer stage."""
    logs_dir = Path(up["state"]["session_dir"]) / "logs" / "maas"

    def logged(content: str, stages: set[str]) -> dict:
        stream = _client(up).chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}], max_tokens=6, stream=True)
        request_id = list(stream)[0].id.removeprefix("chatcmpl-")

        def stages_with_id():
            found = {}
            for path in logs_dir.glob("*.jsonl"):
                for line in path.read_text().splitlines():
                    rec = json.loads(line)  # every line is JSON
                    if rec.get("request_id") == request_id or request_id in rec.get("request_ids", []):
                        found.setdefault(rec["stage"], rec)
            return found if set(found) == stages else None

        return _wait_for(stages_with_id, 30)

    short = logged("Hi", set(STAGES) - {"tokenizer"})
    found = logged("Tell me about the sea. " * 200, set(STAGES))  # 4,600 characters: past the inline bound
    for rec in (short, found):
        assert rec["ingress"]["status"] == "ok" and rec["ingress"]["tenant"] == "local" and rec["ingress"]["ttft_s"] > 0
        assert rec["generator"]["completion_tokens"] == rec["ingress"]["completion_tokens"]
    assert found["tokenizer"]["prompt_tokens"] == found["ingress"]["prompt_tokens"]


def test_metrics_names_on_rays_endpoint_after_traffic(up):
    client = _client(up)
    client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=5, stream=False)
    wanted = [
        "ray_maas_requests_total", "ray_maas_tokens_total", "ray_maas_time_to_first_token_seconds_bucket",
        "ray_maas_inter_token_latency_seconds_bucket", "ray_maas_request_duration_seconds_bucket", "ray_maas_queue_wait_seconds_bucket",
        "ray_maas_billing_ledger_lag_seconds", "ray_maas_billing_tokens_total", "ray_vllm_request_queue_time_seconds_bucket",
    ]  # fmt: skip

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{up['ports']['metrics']}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return text if all(name in text for name in wanted) else None

    text = _wait_for(scrape, 60, 2.0)
    ok = [line for line in text.splitlines() if line.startswith("ray_maas_requests_total{")]
    assert any('status="ok"' in line and 'tenant="local"' in line and 'version="v1"' in line for line in ok), ok


def test_admin_actions_are_audited(up, env):
    created = maas(env, "keys", "create", "--tenant", "audited", "--name", "ops test")
    assert created.returncode == 0, created.stderr
    key = re.search(r"(sk-maas-\S+)", created.stdout.split("shown only now:")[1]).group(1)
    key_id = "-".join(key.split("-")[:3])
    updated = maas(env, "keys", "update", key_id, "--rpm", "5", "--model", "SmolLM2-135M-Instruct")
    assert updated.returncode == 0 and "SmolLM2-135M-Instruct; 5 RPM" in updated.stdout, updated.stderr
    both = maas(env, "keys", "update", key_id, "--rpm", "5", "--clear", "rpm")
    assert both.returncode != 0 and "--clear rpm" in both.stderr
    assert maas(env, "keys", "revoke", key_id).returncode == 0
    audit = maas(env, "audit", "--limit", "20")
    assert audit.returncode == 0, audit.stderr
    lines = audit.stdout.splitlines()
    assert any("key.create" in line and key_id in line and "cli" in line for line in lines), audit.stdout
    assert any("key.revoke" in line and key_id in line for line in lines), audit.stdout
    assert any("key.update" in line and key_id in line and "rpm=5" in line for line in lines), audit.stdout
    import httpx

    body = httpx.get(up["url"].removesuffix("/v1") + "/admin/audit", headers={"Authorization": f"Bearer {up['admin']}"}, timeout=30).json()
    assert {("key.create", key_id), ("key.revoke", key_id)} <= {(a["action"], a["target"]) for a in body["data"]}


def test_no_key_secret_in_any_log_line(up, env):
    secrets_ = [k.split("-", 3)[3] for k in (up["key"], up["admin"])]
    try:  # a wrong key is logged as a rejection, never printed
        _client(up, "sk-maas-deadbeef-" + "y" * 43).chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    except Exception:
        pass
    secrets_.append("y" * 43)
    session = Path(up["state"]["session_dir"])
    files = [p for p in session.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".jsonl", ".txt", "")]
    files.append(Path(up["state"]["log_path"]))
    assert len(files) > 10
    for path in files:
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        for secret in secrets_:
            assert secret not in text, f"key material in {path}"


def test_deploy_updates_the_running_cluster(up, env):
    result = subprocess.run([MAAS, "deploy"], env={**env, "MAAS_PORT": str(up["ports"]["api"])}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Serving at {up['url']}" in result.stdout and "done in" in result.stderr
    assert _client(up).models.list().data[0].id == "SmolLM2-135M-Instruct"  # still answering with the same keys


def test_down_leaves_no_ray_process_behind(up, env):
    import psutil

    session = Path(up["state"]["session_dir"]).name
    result = maas(env, "down", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
    assert left == [] and not psutil.pid_exists(up["state"]["pid"])
    assert "killed" not in result.stderr, result.stderr  # Ray's own shutdown sufficed
    from ray._common.utils import get_ray_address_file

    current = Path(get_ray_address_file(None))  # where Ray's clients without an address look first
    assert not current.exists() or current.read_text().strip() != up["state"]["gcs_address"]
    t0 = time.monotonic()
    after = maas(env, "status", timeout=60)
    assert after.returncode != 0 and ("Ray is not running" in after.stderr or "No Ray cluster answers" in after.stderr), after.stderr
    assert time.monotonic() - t0 < 15  # a clear error at once, not Ray's connection timeout
