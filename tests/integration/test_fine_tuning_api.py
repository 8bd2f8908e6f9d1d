"""Fine-tuning as a service for real, with the official `openai` client: upload, a LoRA job of a few steps run as a
Ray job beside the serving graph on the same 2 CPUs, its events and checkpoints, the fine-tune served on the
base's vLLM engine as an adapter, invisible to another tenant, and the ledger's training and inference lines;
then a running job cancelled and billed for what it trained.

The module starts its own cluster with the dashboard (the Ray Jobs API) and serves from a store of its own.
"""

from __future__ import annotations

import os
import time
from decimal import Decimal

import pytest

from billing.actor import admin_client
from billing.admin import wait
from cluster import local
from common.runtime import REPO_ROOT, free_port
from tests.integration.conftest import create_key, linked_store

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
SAMPLE = REPO_ROOT / "training" / "datasets" / "pirate_sft.jsonl"
PROMPT = [{"role": "user", "content": "Where is the treasure buried?"}]


@pytest.fixture(scope="module")
def config_overrides(tmp_path_factory) -> dict:
    return {"model_store": {"root": str(linked_store(tmp_path_factory))}, "fine_tuning": {"max_steps": 8, "poll_s": 1.0}}


@pytest.fixture(scope="module")
def dashboard(maas_config):
    """This module's cluster has the dashboard: fine-tuning jobs are Ray jobs."""
    url = local.start_ray(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_port=free_port(), config=maas_config)
    try:
        yield url
    finally:
        local.stop()


@pytest.fixture(scope="module")
def base_url(dashboard, maas_config):
    return local.deploy(maas_config)


def _client(base_url: str, key: str):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)


def _until(check, timeout_s: float, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)
    return value


def _answer(client, model: str) -> str:
    return client.chat.completions.create(model=model, messages=PROMPT, max_tokens=24, temperature=0).choices[0].message.content


def test_a_tenant_fine_tunes_and_calls_its_private_model(base_url, billing_actor):
    from openai import NotFoundError

    key, _ = create_key(billing_actor, "tuner", plan="pro")
    tuner = _client(base_url, key)
    other_key, _ = create_key(billing_actor, "bystander", plan="pro")
    other = _client(base_url, other_key)

    upload = tuner.files.create(file=SAMPLE.open("rb"), purpose="fine-tune")
    job = tuner.fine_tuning.jobs.create(model=MODEL, training_file=upload.id, suffix="pirate", hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2})
    assert job.status == "queued" and job.method.type == "lora"
    done = _until(lambda: (j := tuner.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j, 600)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{MODEL}:tuner:pirate:{job.id[6:14]}" and done.trained_tokens > 0

    events = list(tuner.fine_tuning.jobs.list_events(job.id, limit=200))
    losses = [e.data["train_loss"] for e in events if e.type == "metrics" and "train_loss" in e.data][::-1]
    valid = [e.data["valid_loss"] for e in events if e.type == "metrics" and "valid_loss" in e.data][::-1]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # loss falls
    assert len(valid) == 2 and valid[-1] < valid[0], valid  # held-out loss before and after
    assert any("Started as Ray job" in e.message for e in events)
    assert [c.step_number for c in tuner.fine_tuning.jobs.checkpoints.list(job.id)][0] == 8

    # Served at once on the base's engine, to its tenant only.
    assert done.fine_tuned_model in [m.id for m in tuner.models.list()]
    assert done.fine_tuned_model not in [m.id for m in other.models.list()]
    tuned, base = _answer(tuner, done.fine_tuned_model), _answer(tuner, MODEL)
    assert tuned != base, (tuned, base)
    with pytest.raises(NotFoundError):
        other.chat.completions.create(model=done.fine_tuned_model, messages=PROMPT, max_tokens=4)
    with pytest.raises(NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    assert list(other.fine_tuning.jobs.list()) == [] and list(other.files.list()) == []

    # The ledger: the training tokens and the inference tokens, each under the fine-tune's id.
    def lines():
        rows = wait(admin_client(billing_actor).spend_rows(None, "tuner"))
        return {(r.model, r.version): r for r in rows}

    # Both calls' reports travel asynchronously (each through its outbox): wait for both lines, not just the first call's.
    got = _until(lambda: (ls := lines()) and {(done.fine_tuned_model, "v1"), (MODEL, "v1")} <= ls.keys() and ls, 30, 0.5)
    training = got[(done.fine_tuned_model, "training")]
    assert training.prompt_tokens == done.trained_tokens and training.requests == 1
    assert training.amount == Decimal(done.trained_tokens) * Decimal("0.50") / 1_000_000
    assert got[(done.fine_tuned_model, "v1")].requests == 1 and got[(MODEL, "v1")].requests == 1


def test_cancelling_a_running_job_stops_it_and_bills_what_it_trained(base_url, billing_actor):
    key, _ = create_key(billing_actor, "quitter", plan="pro")
    client = _client(base_url, key)
    upload = client.files.create(file=SAMPLE.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id, hyperparameters={"n_epochs": 1})
    _until(lambda: any(e.type == "metrics" and "train_loss" in e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=50)), 300)
    client.fine_tuning.jobs.cancel(job.id)
    ended = _until(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status != "running" and j, 120)
    assert ended.status == "cancelled" and 0 < ended.trained_tokens
    rows = _until(lambda: wait(admin_client(billing_actor).events([job.id])), 30, 0.5)
    assert rows[0].prompt_tokens == ended.trained_tokens and rows[0].version == "training"
    # Operators see it from the CLI.
    from click.testing import CliRunner

    from cluster.cli import main

    listed = CliRunner().invoke(main, ["fine-tunes", "list", "--tenant", "quitter"])
    assert listed.exit_code == 0 and job.id in listed.output and "cancelled" in listed.output, listed.output
    shown = CliRunner().invoke(main, ["fine-tunes", "show", job.id])
    assert shown.exit_code == 0 and "training loss" in shown.output and "cancelled" in shown.output, shown.output
    # Its CPUs are free again: the operator's job in the next test needs them beside serving.


def test_an_operators_ray_job_submit_of_the_shipped_config_fits_beside_serving_and_registers_a_version(base_url, dashboard, maas_config, tmp_path):
    """`ray job submit ... --config training/configs/pirate.yaml` asks for 2 workers × 0.8 CPU; beside the graph it runs with what is free,
    and publishes the next version of the model with its lineage (the job's submission id among it)."""
    import hashlib
    import re
    import shlex

    from ray.job_submission import JobStatus, JobSubmissionClient
    from transformers import AutoConfig

    from common import envs
    from common.model_store import open_store
    from common.runtime import RUNTIME_EXCLUDES

    client = JobSubmissionClient(dashboard)
    # `python` as the docs write it: the cluster's PATH starts with the folder of the interpreter that runs it (common.runtime.use_local_env).
    entry = ["python", "-m", "training.finetune", "--config", "training/configs/pirate.yaml", "--set", "optim.max_steps=2", "--set", "optim.warmup_steps=1",
             "--set", "checkpoint.every_steps=100", "--set", f"checkpoint.storage_path={tmp_path}", "--set", f"model_store={maas_config.store_root()}"]  # fmt: skip
    job_id = client.submit_job(
        entrypoint=" ".join(shlex.quote(a) for a in entry), runtime_env={"working_dir": str(REPO_ROOT), "excludes": RUNTIME_EXCLUDES, "env_vars": envs.job_env()}
    )
    status = _until(lambda: (st := client.get_job_status(job_id)) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and st, 420, 3.0)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "1 worker(s) × 0.80 CPU (asked for 2 × 0.80)" in logs and "step 2/2" in logs

    registered = re.search(r"registered (\S+)/(v\d+)", logs)
    assert registered and registered.group(1) == MODEL, logs[-3000:]
    mv = open_store(maas_config.store_root()).resolve(MODEL, registered.group(2))
    lineage = mv.metadata["lineage"]
    assert lineage["base"] == {"name": MODEL, "version": "v1"}
    assert lineage["dataset"]["sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert lineage["run"]["submission_id"] == job_id and lineage["run"]["ray_job_id"] and lineage["config"]["optim"]["max_steps"] == 2
    assert AutoConfig.from_pretrained(mv.path).num_hidden_layers == 30  # a loadable HF folder of the 135M model
