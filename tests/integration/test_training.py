"""Ray Train fine-tuning for real: two DDP workers on CPU whose held-out loss falls, through a worker killed mid-run.

The module starts its own local Ray cluster (with the dashboard, for the state API) and uses a model
store of its own (the default model's v1 linked in).  A `ray job submit` of the shipped config to a
cluster that is serving, publishing a version with its lineage, is test_fine_tuning_api's.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cluster import local
from common.runtime import REPO_ROOT, free_port
from tests.integration.conftest import linked_store
from training.config import load_train_config

pytestmark = pytest.mark.integration
TINY = REPO_ROOT / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    store = linked_store(tmp_path_factory)
    storage = tmp_path_factory.mktemp("runs")
    dashboard_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        # Set before Ray starts, so every Ray process (job drivers, Train workers) inherits them.
        mp.setenv("MAAS_MODEL_STORE", str(store))
        mp.setenv("MAAS_TRAIN_STORAGE", str(storage))
        local.start_ray(num_cpus=2, include_dashboard=True, dashboard_port=dashboard_port)
        try:
            yield {"store": store, "storage": storage, "dashboard": f"http://127.0.0.1:{dashboard_port}"}
        finally:
            local.stop()


def test_two_workers_fine_tune_and_a_worker_killed_mid_run_resumes_from_the_checkpoint(cluster):
    from ray.util.state import list_actors

    from training.finetune import run

    cfg = load_train_config(TINY, {"run_name": "killed", "optim": {"max_steps": 30}, "checkpoint": {"every_steps": 5}, "output": {"publish": False}})
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
    assert m["step"] == 30 and m["resumed_from_step"] >= 5, m  # the new worker group started from a checkpoint, not from 0
    assert m["world_size"] == 2 and m["tokens_per_s"] > 0 and box["result"].version is None
    assert m["eval_loss"] < m["eval_loss_before"] - 1.0, m  # random init: ~ln(vocab) = 10.8 falls fast
    checkpoint = Path(box["result"].checkpoint_path)
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "optimizer.pt").exists()  # the result holds weights, not optimizer state
