"""Ray Train fine-tuning for real: two DDP workers on CPU, `ray job submit` to a local head, and recovery from a killed worker.

The module starts its own local Ray cluster (with the dashboard, for the job API) and
uses a model store of its own (the default model's v1 linked in), so the versions it
publishes never reach other modules.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster import local
from common.config import load_config
from common.model_store import ensure_default_model, open_store
from common.runtime import REPO_ROOT, free_port
from training.config import load_train_config

pytestmark = pytest.mark.integration
TINY = REPO_ROOT / "training" / "configs" / "tiny.yaml"


def linked_store(tmp_path_factory) -> Path:
    """A store of our own holding the default model's v1 (a link, not a copy)."""
    config = load_config()
    default = ensure_default_model(open_store(config.store_root()), config.model.name)
    root = tmp_path_factory.mktemp("store")
    open_store(root).link_version(default)
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    store = linked_store(tmp_path_factory)
    storage = tmp_path_factory.mktemp("runs")
    dashboard_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        # Set before Ray starts, so every Ray process (job drivers, Train workers) inherits them.
        mp.setenv("MAAS_MODEL_STORE", str(store))
        mp.setenv("MAAS_TRAIN_STORAGE", str(storage))
        # A job's `python` is looked up on the cluster's PATH: make it this environment's, as an activated venv would.
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        local.start_ray(num_cpus=2, include_dashboard=True, dashboard_port=dashboard_port)
        try:
            yield {"store": store, "storage": storage, "dashboard": f"http://127.0.0.1:{dashboard_port}"}
        finally:
            local.stop()


def test_two_workers_fine_tune_a_tiny_model_and_its_held_out_loss_falls(cluster):
    from training.finetune import run

    result = run(load_train_config(TINY, {"optim": {"max_steps": 20}, "output": {"publish": False}}))
    m = result.metrics
    assert m["world_size"] == 2 and m["step"] == 20
    assert m["eval_loss"] < m["eval_loss_before"] - 1.0, m  # random init: ~ln(vocab) = 10.8 falls fast
    assert m["tokens_per_s"] > 0 and result.version is None
    assert Path(result.checkpoint_path, "model.safetensors").is_file() and not Path(result.checkpoint_path, "optimizer.pt").exists()


def test_ray_job_submit_trains_and_registers_a_version(cluster):
    ray_cli = Path(sys.executable).with_name("ray")
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(ray_cli), "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--",
         "python", "-m", "training.finetune", "--config", "training/configs/tiny.yaml", "--set", "optim.max_steps=10"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "step 10/10" in logs and "registered tiny-pirate/v1" in logs  # progress and the result reach the job logs
    mv = open_store(cluster["store"]).resolve("tiny-pirate", "v1")
    lineage = mv.metadata["lineage"]
    assert lineage["base"] == {"name": "SmolLM2-135M-Instruct", "version": "v1"}
    assert lineage["dataset"]["sha256"] == __import__("hashlib").sha256((REPO_ROOT / "training/datasets/pirate_sft.jsonl").read_bytes()).hexdigest()
    assert lineage["run"]["submission_id"].startswith("raysubmit_") and lineage["run"]["ray_job_id"] and lineage["config"]["optim"]["max_steps"] == 10
    assert mv.metadata["eval"]["eval_loss"] < mv.metadata["eval"]["eval_loss_before"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(mv.path).config.num_hidden_layers == 2  # a loadable HF folder
    print(f"ray job submit -> registered version in {time.monotonic() - t0:.0f}s")


def test_a_worker_killed_mid_run_resumes_from_the_checkpoint(cluster):
    from ray.util.state import list_actors

    from training.finetune import run

    cfg = load_train_config(TINY, {"run_name": "killed", "optim": {"max_steps": 60}, "checkpoint": {"every_steps": 5}, "output": {"publish": False}})
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=run(cfg)), daemon=True)
    worker.start()
    run_dir = Path(cluster["storage"]) / "killed"
    deadline = time.monotonic() + 300
    # Wait for the second checkpoint folder: the first one is then surely committed to the run's record.
    while not (run_dir / "step_000010").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (run_dir / "step_000010").exists(), "no checkpoint appeared"
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]) if a.pid]
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    worker.join(timeout=600)
    m = box["result"].metrics
    assert m["step"] == 60 and m["resumed_from_step"] >= 5, m  # the new worker group started from a checkpoint, not from 0
    assert m["eval_loss"] < m["eval_loss_before"]
