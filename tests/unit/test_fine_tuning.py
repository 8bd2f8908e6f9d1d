"""OpenAI's fine-tuning API over the real routes, manager and billing core, with a fake cluster in place of Ray's Jobs API (no Ray).

The fake cluster implements `JobCluster`: it records what was submitted and, when told, plays the
training job's part (the run report and the adapter published in the store), so the queue, the
events, the billing and the serving of the fine-tune are the real code's.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml

from billing.service import BillingCore
from common.config import BillingConfig, LeaseConfig, MaasConfig, Plan, PriceBook
from common.model_store import METADATA_FILE
from common.run_reports import RunReport
from common.runtime import REPO_ROOT
from deployments.core.adapters import AdapterCatalog
from deployments.core.fine_tune_manager import FineTuneManager
from deployments.core.fine_tunes import Job, decide_starts, estimate_tokens, sizing
from deployments.openai.fine_tuning import FineTuneBackend, FineTuningService
from tests.fakes import ScriptedEngine
from tests.unit.test_metering import Server

GOOD = "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"arr {i}"}]}) + "\n" for i in range(12)).encode()


class FakeJobCluster:
    """`JobCluster` in memory: `free` CPUs, submitted jobs, and their states as the test sets them."""

    def __init__(self, free: float = 2.0):
        self.free = free
        self.submitted: dict[str, str] = {}  # ray job id -> train.yaml
        self.states: dict[str, tuple[str, str]] = {}
        self.stopped: list[str] = []

    def free_cpus(self) -> float:
        return self.free

    def submit(self, job_id: str, config_path: str) -> str:
        ray_id = f"raysubmit-{job_id}"
        self.submitted[ray_id] = config_path
        self.states[ray_id] = ("RUNNING", "")
        return ray_id

    def status(self, ray_job_id: str) -> tuple[str, str]:
        return self.states[ray_job_id]

    def stop(self, ray_job_id: str) -> None:
        self.stopped.append(ray_job_id)
        self.states[ray_job_id] = ("STOPPED", "stopped")

    def train(self, ray_job_id: str, steps: int, tokens_per_step: int = 100, finish: bool = True) -> dict:
        """Play the training job: steps and a checkpoint in its report; when finishing, the adapter published and the result."""
        cfg = yaml.safe_load(Path(self.submitted[ray_job_id]).read_text())
        report = RunReport(cfg["output"]["report_dir"])
        for step in range(1, steps + 1):
            report.event("step", step=step, max_steps=steps, epoch=0, loss=3.0 - 0.2 * step, lr=1e-3, tokens=tokens_per_step, trained_tokens=step * tokens_per_step)
        report.checkpoint(steps, f"step_{steps:06d}", {"loss": 3.0 - 0.2 * steps, "trained_tokens": steps * tokens_per_step})
        if finish:
            folder = Path(cfg["model_store"]) / cfg["output"]["name"] / "v1"
            folder.mkdir(parents=True)
            (folder / "adapter_config.json").write_text("{}")
            meta = {**cfg["output"]["metadata"], "name": cfg["output"]["name"], "version": "v1", "adapter": {"base": {"name": cfg["base"]["name"], "version": cfg["base"]["version"]}}}
            (folder / METADATA_FILE).write_text(json.dumps(meta))
            report.event("eval", step=steps, eval_loss=1.5)
            report.finish(status="succeeded", trained_tokens=steps * tokens_per_step, model=cfg["output"]["name"], version="v1")
            self.states[ray_job_id] = ("SUCCEEDED", "")
        return cfg


def billing_config(**plans: Plan) -> BillingConfig:
    return BillingConfig(
        price_book=PriceBook(models={
            "m": {"prompt_per_1m": "0.50", "completion_per_1m": "1.50", "training_per_1m": "100"},
            "m2": {"prompt_per_1m": "0.50", "completion_per_1m": "1.50", "training_per_1m": "200"},  # a second chat model, when a test serves one
        }),
        plans=plans, default_plan="free", lease=LeaseConfig(restart_grace_s=0),
    )  # fmt: skip


class Rig:
    def __init__(self, tmp_path, free_cpus: float = 2.0, prefix: str = "", max_file_bytes: int | None = None, operations=None, serving=None, models=()):
        self.cluster = FakeJobCluster(free_cpus)
        self.store = tmp_path / "store"
        small = Plan(max_files=2, max_file_storage_mib=0.01, fine_tune_queued=1, max_keys=3)
        plans = billing_config(free=Plan(), tiny=Plan(monthly_budget=Decimal("0.001")), two=Plan(fine_tune_jobs=2), small=small, slow=Plan(rpm=3))
        self.cfg = MaasConfig.model_validate({"model": {"name": "m"}, "models": list(models), "model_store": {"root": str(self.store)}, "billing": plans.model_dump(mode="json")})
        self.manager: FineTuneManager | None = None

        def fine_tuning(core: BillingCore, store: Path) -> FineTuningService:
            self.manager = FineTuneManager(self.cfg, self.cluster, core, serving=serving)
            return FineTuningService(FineTuneBackend.in_process(self.manager), self.cfg, lambda model: "v1")

        self.server = Server(tmp_path, ScriptedEngine(reply="arr"), billing_config=plans, fine_tuning=fine_tuning, adapters=AdapterCatalog(str(self.store), "m", ttl_s=0), prefix=prefix, max_file_bytes=max_file_bytes, operations=operations)

    def client(self, key: str):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.server.base}/v1", api_key=key, max_retries=0)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    with r.server:
        yield r


def _upload(client, data: bytes = GOOD) -> str:
    return client.files.create(file=("data.jsonl", data), purpose="fine-tune").id


def test_a_tenant_fine_tunes_watches_and_calls_its_model_and_no_one_else_sees_it(rig):
    from openai import NotFoundError

    acme = rig.client(rig.server.key)
    globex_key, _ = rig.server.core.create_key("globex")
    globex = rig.client(globex_key)
    file_id = _upload(acme)
    job = acme.fine_tuning.jobs.create(model="m", training_file=file_id, suffix="pirate", hyperparameters={"n_epochs": 2})
    assert job.status == "queued" and job.fine_tuned_model is None and job.hyperparameters.n_epochs == 2 and job.method.type == "lora"
    rig.manager.tick()
    ray_id, config_path = next(iter(rig.cluster.submitted.items()))
    cfg = yaml.safe_load(Path(config_path).read_text())
    assert cfg["method"]["type"] == "lora" and cfg["optim"]["epochs"] == 2 and cfg["output"]["name"] == f"ft:m:acme:pirate:{job.id[6:14]}"
    assert cfg["scaling"]["num_workers"] == 2 and cfg["data"]["path"].endswith(f"{job.id}/data/training.jsonl")  # sized from the free CPUs; the job's own copy
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "running"

    rig.cluster.train(ray_id, steps=4)
    rig.manager.tick()
    done = acme.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == cfg["output"]["name"] and done.trained_tokens == 400
    events = list(acme.fine_tuning.jobs.list_events(job.id, limit=100))
    losses = [e.data["train_loss"] for e in events if e.type == "metrics" and "train_loss" in e.data][::-1]
    assert losses == sorted(losses, reverse=True) and len(losses) == 4  # falling
    assert any("succeeded" in e.message for e in events) and any("Started as Ray job" in e.message for e in events)
    assert [c.step_number for c in acme.fine_tuning.jobs.checkpoints.list(job.id)] == [4]

    # Billed once, as training, under the fine-tune's id; the hold is gone.
    rows = [r for r in rig.server.core.ledger.events([job.id])]
    assert len(rows) == 1 and rows[0].version == "training" and rows[0].model == done.fine_tuned_model and rows[0].prompt_tokens == 400
    assert rig.server.core.committed("acme", rows[0].ts and time.strftime("%Y-%m", time.gmtime(rows[0].ts))) == Decimal(400) * Decimal(100) / 1_000_000

    # Served to its tenant only, on the base's engine with the adapter applied.
    assert done.fine_tuned_model in [m.id for m in acme.models.list()] and done.fine_tuned_model not in [m.id for m in globex.models.list()]
    reply = acme.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    assert reply.model == done.fine_tuned_model and rig.server.engine.requests[-1].adapter[0] == done.fine_tuned_model
    with pytest.raises(NotFoundError):
        globex.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(NotFoundError):
        globex.fine_tuning.jobs.retrieve(job.id)
    assert list(globex.fine_tuning.jobs.list()) == [] and list(globex.files.list()) == []


class FakeServing:
    """`AdapterServing` whose engines serve adapters after `rolls` looks (each look while not: a roll in progress;
    the first one fails, as Serve may while the cluster is busy)."""

    def __init__(self, rolls: int):
        self.rolls, self.looks = rolls, 0

    def adapters_served(self, model: str) -> bool:
        self.looks += 1
        if self.looks == 1:
            raise RuntimeError("Serve is busy")
        return self.looks > self.rolls


def test_the_first_adapter_turns_lora_on_before_its_job_succeeds(tmp_path):
    """`engine.enable_lora: auto`: engines start without LoRA while the model has no adapter; the job whose adapter is
    the first waits, running and saying why, until the engines serve adapters, so `succeeded` means callable."""
    from deployments.core.adapters import adapters_wanted
    from deployments.core.generator import engine_args

    serving = FakeServing(rolls=2)
    r = Rig(tmp_path, serving=serving)
    assert r.cfg.engine.enable_lora == "auto" and not adapters_wanted("auto", str(r.store), "m")
    assert "enable_lora" not in engine_args("/m", r.cfg.engine) and adapters_wanted(True, str(r.store), "m")
    with r.server:
        acme = r.client(r.server.key)
        job = acme.fine_tuning.jobs.create(model="m", training_file=_upload(acme))
        r.manager.tick()
        ray_id = next(iter(r.cluster.submitted))
        r.cluster.train(ray_id, steps=2)
        assert adapters_wanted("auto", str(r.store), "m")  # published: the next deploy resolves `auto` to on
        r.manager.tick()
        r.manager.tick()
        assert acme.fine_tuning.jobs.retrieve(job.id).status == "running" and serving.looks == 2
        said = [e.message for e in acme.fine_tuning.jobs.list_events(job.id, limit=100) if "restarting to serve fine-tuned adapters" in e.message]
        assert len(said) == 1  # said once, however many ticks it takes
        r.manager.tick()
        assert acme.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


class RecordingServing:
    """`AdapterServing` whose engines already serve adapters; records which model's were asked about."""

    def __init__(self):
        self.models: list[str] = []

    def adapters_served(self, model: str) -> bool:
        self.models.append(model)
        return True


def test_a_second_chat_model_is_fine_tuned_on_its_own_stable_version_at_its_own_price(tmp_path):
    serving = RecordingServing()
    r = Rig(tmp_path, serving=serving, models=[{"name": "m2", "task": "chat"}, {"name": "emb", "task": "embed"}])
    with r.server:
        acme = r.client(r.server.key)
        job = acme.fine_tuning.jobs.create(model="m2", training_file=_upload(acme))
        assert job.model == "m2"
        from openai import NotFoundError

        with pytest.raises(NotFoundError) as err:
            acme.fine_tuning.jobs.create(model="emb", training_file=_upload(acme))  # an embedding model is not fine-tuned
        assert "m, m2" in err.value.body["message"]
        r.manager.tick()
        ray_id = next(iter(r.cluster.submitted))
        cfg = r.cluster.train(ray_id, steps=2)
        r.manager.tick()
        done = acme.fine_tuning.jobs.retrieve(job.id)
        rows = r.server.core.ledger.events([job.id])
    assert cfg["base"]["name"] == "m2" and cfg["output"]["name"] == done.fine_tuned_model and done.fine_tuned_model.startswith("ft:m2:")
    assert done.status == "succeeded" and serving.models == ["m2"]  # m2's engines are the ones that must serve it
    assert rows[0].version == "training" and rows[0].amount() == Decimal(rows[0].prompt_tokens) * Decimal(200) / 1_000_000  # m2's training price


def test_jobs_wait_for_room_and_for_their_tenants_limit_saying_why(tmp_path):
    rig = Rig(tmp_path, free_cpus=0.3)
    with rig.server:
        acme = rig.client(rig.server.key)
        first = acme.fine_tuning.jobs.create(model="m", training_file=_upload(acme))
        rig.manager.tick()
        got = acme.fine_tuning.jobs.retrieve(first.id)
        assert got.status == "queued" and "Waiting for CPUs" in got.model_extra["queue_reason"] and "0.3 are free" in got.model_extra["queue_reason"]
        assert any("Waiting for CPUs" in e.message for e in acme.fine_tuning.jobs.list_events(first.id))
        rig.cluster.free = 1.2
        second = acme.fine_tuning.jobs.create(model="m", training_file=_upload(acme))
        other_key, _ = rig.server.core.create_key("globex")
        other = rig.client(other_key)
        third = other.fine_tuning.jobs.create(model="m", training_file=_upload(other))
        rig.cluster.free = 5.0
        rig.manager.tick()
        states = {j: rig.manager.get(None, j)["status"] for j in (first.id, second.id, third.id)}
        assert states == {first.id: "running", second.id: "queued", third.id: "running"}  # one per tenant on the free plan; globex is not held back
        assert "the plan allows 1 at a time" in rig.manager.get(None, second.id)["queue_reason"]


def test_cancelling_bills_what_was_trained_and_a_queued_job_nothing(rig):
    acme = rig.client(rig.server.key)
    running = acme.fine_tuning.jobs.create(model="m", training_file=_upload(acme))
    waiting = acme.fine_tuning.jobs.create(model="m", training_file=_upload(acme))
    rig.manager.tick()
    ray_id = next(iter(rig.cluster.submitted))
    rig.cluster.train(ray_id, steps=3, finish=False)
    assert acme.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"
    assert acme.fine_tuning.jobs.cancel(running.id).status == "running"  # stopping
    rig.manager.tick()
    stopped = acme.fine_tuning.jobs.retrieve(running.id)
    assert stopped.status == "cancelled" and stopped.trained_tokens == 300 and rig.cluster.stopped == [ray_id]
    assert [r.prompt_tokens for r in rig.server.core.ledger.events([running.id])] == [300]
    assert rig.server.core.ledger.events([waiting.id]) == []
    period = time.strftime("%Y-%m", time.gmtime())
    assert rig.server.core.committed("acme", period) == Decimal(300) * Decimal(100) / 1_000_000  # no hold left
    from openai import BadRequestError

    with pytest.raises(BadRequestError):
        acme.fine_tuning.jobs.cancel(running.id)


def test_bad_jobs_are_clear_4xx_and_create_nothing(rig):
    from openai import APIStatusError

    acme = rig.client(rig.server.key)
    file_id = _upload(acme)
    other_key, _ = rig.server.core.create_key("globex")
    theirs = _upload(rig.client(other_key))
    poor_key, _ = rig.server.core.create_key("poor", plan="tiny")
    poor = rig.client(poor_key)
    poor_file = _upload(poor, GOOD * 20)
    cases = [
        (acme, {"model": "gpt-4o", "training_file": file_id}, 404, "model"),
        (acme, {"model": "m", "training_file": theirs}, 400, "training_file"),
        (acme, {"model": "m", "training_file": "file-000000000000000000000000"}, 400, "training_file"),
        (acme, {"model": "m", "training_file": file_id, "validation_file": theirs}, 400, "validation_file"),
        (acme, {"model": "m", "training_file": file_id, "method": {"type": "full"}}, 403, "method"),
        (acme, {"model": "m", "training_file": file_id, "method": {"type": "lora", "lora": {"rank": 64}}}, 400, "method.lora.rank"),
        (acme, {"model": "m", "training_file": file_id, "hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters"),
        (acme, {"model": "m", "training_file": file_id, "suffix": "no spaces"}, 400, "suffix"),
        (poor, {"model": "m", "training_file": poor_file}, 429, None),
    ]
    for client, body, status, param in cases:
        with pytest.raises(APIStatusError) as info:
            client.fine_tuning.jobs.create(**body)
        err = info.value.body
        assert info.value.status_code == status and err.get("param") == param, (body, err)
    assert err["code"] == "insufficient_quota" and "budget" in err["message"]
    assert rig.manager.list(None)["data"] == [] and not list(rig.store.glob(".fine_tunes/ftjob-*"))  # nothing half-created
    resp = httpx.post(f"http://127.0.0.1:{rig.server.port}/v1/fine_tuning/jobs", json={"model": "m"}, headers={"Authorization": f"Bearer {rig.server.key}"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "training_file"


def test_a_restarted_manager_carries_on(rig):
    acme = rig.client(rig.server.key)
    job = acme.fine_tuning.jobs.create(model="m", training_file=_upload(acme))
    rig.manager.tick()
    again = FineTuneManager(rig.cfg, rig.cluster, rig.server.core)
    ray_id = next(iter(rig.cluster.submitted))
    rig.cluster.train(ray_id, steps=2)
    again.tick()
    assert again.get("acme", job.id)["status"] == "succeeded"
    again.tick()
    assert len(rig.server.core.ledger.events([job.id])) == 1


def test_queue_decisions_and_estimates_are_plain_data():
    assert sizing(2.0, 2, 0.8, 0.4) == (2, 0.8) and sizing(1.2, 2, 0.8, 0.4) == (1, 0.8) and sizing(0.8, 2, 0.8, 0.4) == (1, 0.6) and sizing(0.5, 2, 0.8, 0.4) is None
    assert estimate_tokens(100, 4, 3) == (100 + 16 * 4) * 3

    def job(i: str, tenant: str, t: int) -> Job:
        return Job(i, tenant, "", "m", "v1", "f", None, None, "lora", 1, 4, 1.0, 8, 16.0, 0, t, "ft", 10, "1")

    jobs = [job("a1", "a", 1), job("a2", "a", 2), job("b1", "b", 3)]
    d = decide_starts(jobs, 2.0, lambda t: 1, 2, 0.8, 0.4)
    assert [s[0] for s in d.start] == ["a1"] and set(d.waiting) == {"a2", "b1"}  # b1 waits for room behind a1, not for a's limit
    d = decide_starts(jobs, 4.0, lambda t: 1, 2, 0.8, 0.4)
    assert [s[0] for s in d.start] == ["a1", "b1"] and "a2" in d.waiting


def test_an_operators_job_fits_itself_beside_serving_or_waits_saying_so(caplog):
    from training.config import load_train_config
    from training.finetune import fit_to_cluster

    pirate = load_train_config(REPO_ROOT / "training/configs/pirate.yaml")  # 2 workers × 0.8 CPU
    assert (pirate.scaling.num_workers, pirate.scaling.cpus_per_worker) == (2, 0.8)
    beside_serving = fit_to_cluster(pirate, lambda: 1.2)  # the 2-CPU default with the graph holding 0.8
    assert (beside_serving.scaling.num_workers, beside_serving.scaling.cpus_per_worker) == (1, 0.8)
    alone = fit_to_cluster(pirate, lambda: 2.0)
    assert (alone.scaling.num_workers, alone.scaling.cpus_per_worker) == (2, 0.8)

    now = [0.0]
    free = iter([0.1] * 8 + [0.9] * 10)
    waited = fit_to_cluster(pirate, lambda: next(free), sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert waited.scaling.num_workers == 1 and now[0] >= 10 and "waiting for CPUs" in caplog.text
    with pytest.raises(RuntimeError, match="Not enough free CPUs"):
        fit_to_cluster(pirate.model_copy(update={"scaling": pirate.scaling.model_copy(update={"wait_s": 10})}), lambda: 0.0, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])


def test_an_admin_key_may_run_a_full_fine_tune_which_makes_the_next_version(rig):
    admin_key, _ = rig.server.core.create_key("ops", role="admin")
    ops = rig.client(admin_key)
    job = ops.fine_tuning.jobs.create(model="m", training_file=_upload(ops), method={"type": "full"})
    assert job.method.type == "full"
    rig.manager.tick()
    ray_id, config_path = next(iter(rig.cluster.submitted.items()))
    cfg = rig.cluster.train(ray_id, steps=2)
    assert cfg["method"]["type"] == "full" and cfg["output"]["name"] == "m" and cfg["scaling"]["fit"] is False
    rig.manager.tick()
    done = ops.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == "m@v1"


def test_maas_usage_shows_a_fine_tunes_training_and_inference_lines_apart_in_aligned_columns():
    from billing.ledger import SpendRow
    from billing.reports import usage_report
    from cluster.cli.accounts import usage_table

    ft, p = "ft:SmolLM2-135M-Instruct:acme:pirate:ef8b386d", Decimal("0.5")
    rows = [
        SpendRow("acme", "2026-12", "SmolLM2-135M-Instruct", "v1", p, p, 1, 35, 30, day="2026-12-06"),
        SpendRow("acme", "2026-12", ft, "training", p, Decimal(0), 1, 20093, 0, day="2026-12-06"),
        SpendRow("acme", "2026-12", ft, "v1", p, p, 1, 35, 30, day="2026-12-06"),
    ]
    lines = usage_table(usage_report(rows, "2026-12", "USD"))
    assert len(lines) == 5 and [line.split()[3] for line in lines[1:4]] == ["v1", "training", "v1"]
    # Every row and the total (less its currency) as wide as the header: no column pushed out of line.
    assert len({len(line) for line in lines[:4]} | {len(lines[4].removesuffix(" USD"))}) == 1
    assert lines[-1].split()[:5] == ["TOTAL", "3", "20163", "0", "60"]  # requests, prompt tokens (none cached), completion tokens
