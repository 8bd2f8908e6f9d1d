"""The fine-tuning queue: holds jobs, starts them as Ray jobs when there is room, watches them, bills them. No Ray here.

The named actor (`deployments.fine_tunes`) wraps one `FineTuneManager` and calls `tick()` every
`fine_tuning.poll_s`; the ingress calls the rest. It reaches the cluster through a `JobCluster`
(Ray's Jobs API in the actor, a fake in unit tests) and billing through a `TrainingBilling`.

Each job lives in `<store root>/.fine_tunes/<job id>/`: `job.json` (the record, replaced atomically),
`data/` (the job's own copy of its training and validation files, pinned with their checksums when the
job is created, so deleting an upload changes nothing for a job that uses it), `train.yaml` (the
training config it runs), `report/` (what the run reports, `common.run_reports`, plus the manager's own
messages). A restarted manager reloads them and carries on: queued jobs stay queued, running ones are
watched again, and budget holds are re-asserted on every tick. A job that cannot start or be watched
fails alone, with a reason its tenant can read; the queue goes on.

Money: creating a job holds its worst case (estimated tokens × training price) against the tenant's
budget, and against the asking key's own budget when it has one, or refuses it (429
`insufficient_quota`, nothing created). A job is billed for the tokens it trained, however it ends:
succeeded, cancelled or failed (a queued job trained nothing and costs nothing). The ledger row's
request id is the job id, so a job is billed exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from common.config import MaasConfig, Plan
from common.errors import InvalidRequestError, MaasError, NotFoundError, RateLimitError
from common.file_store import FileStore
from common.run_reports import RunReport
from deployments.core.fine_tunes import TERMINAL, Job, checkpoint_to_openai, decide_starts, event_to_openai

logger = logging.getLogger(__name__)

STARTING_S = 90.0  # a job's workers may take this long to be placed: count its CPUs as taken meanwhile
ADAPTERS_WAIT_S = 900.0  # the longest a finished LoRA job waits for its base's engines to serve adapters


class JobCluster(Protocol):
    def free_cpus(self) -> float: ...

    def submit(self, job_id: str, config_path: str) -> str: ...  # -> the Ray job's submission id

    def status(self, ray_job_id: str) -> tuple[str, str]: ...  # (PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED, message)

    def stop(self, ray_job_id: str) -> None: ...


class AdapterServing(Protocol):
    def adapters_served(self, model: str) -> bool: ...  # every engine of `model` serves adapters; if not, starts turning them on


class TrainingBilling(Protocol):
    def hold(self, key: str, tenant: str, amount: Decimal, period: str, key_id: str = "") -> None: ...

    def release(self, key: str) -> None: ...

    def record_training(self, job_id: str, tenant: str, key_id: str, model: str, tokens: int, price_per_1m: Decimal, ts: float) -> bool: ...

    def plan(self, tenant: str) -> Plan: ...  # its `fine_tune_jobs` (running at once) and `fine_tune_queued`


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


class FineTuneManager:
    def __init__(
        self,
        config: MaasConfig,
        cluster: JobCluster,
        billing: TrainingBilling | None,
        clock: Callable[[], float] = time.time,
        period: Callable[[float], str] | None = None,
        serving: AdapterServing | None = None,
    ):
        self._cfg = config
        self._ft = config.fine_tuning
        self._root = Path(config.store_root()) / ".fine_tunes"
        self._cluster = cluster
        self._billing = billing
        self._clock = clock
        self._period = period or (lambda t: time.strftime("%Y-%m", time.gmtime(t)))
        self._serving = serving
        self._turning_on: dict[str, float] = {}  # job -> since when it waits for the engines to serve adapters
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._load()

    # ---- persistence -------------------------------------------------------------------------

    def _dir(self, job_id: str) -> Path:
        return self._root / job_id

    def report(self, job_id: str) -> RunReport:
        return RunReport(self._dir(job_id) / "report")

    def _load(self) -> None:
        for path in self._root.glob("ftjob-*/job.json") if self._root.is_dir() else ():
            try:
                job = Job.from_json(json.loads(path.read_text()))
                self._jobs[job.id] = job
            except (OSError, ValueError, TypeError):
                logger.exception("could not read fine-tuning job %s", path)
        if self._jobs:
            logger.info("fine-tuning jobs reloaded: %d (%d not finished)", len(self._jobs), sum(j.status not in TERMINAL for j in self._jobs.values()))

    def _save(self, job: Job) -> None:
        folder = self._dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".job.json.tmp"
        tmp.write_text(json.dumps(job.to_json(), sort_keys=True))
        os.replace(tmp, folder / "job.json")

    def _say(self, job: Job, message: str, level: str = "info") -> None:
        self.report(job.id).event("message", now=self._clock(), level=level, message=message)

    # ---- the API's calls ---------------------------------------------------------------------

    def create(self, job: Job) -> dict:
        """A new queued job: within its tenant's queue limit, its datasets pinned (copied, with their checksums), its
        worst-case cost held against the budget (nothing is created when any of it fails)."""
        with self._lock:
            limit = self._plan(job.tenant).fine_tune_queued
            queued = sum(j.tenant == job.tenant and j.status == "queued" for j in self._jobs.values())
            if limit is not None and queued >= limit:
                raise RateLimitError(f"The tenant has {queued} fine-tuning jobs queued, its plan's limit; wait for one to start or cancel one.", retry_after_s=60)
            try:
                self._pin(job)
                if self._billing is not None:
                    self._billing.hold(job.id, job.tenant, job.reserved, self._period(job.created_at), job.key_id)
            except BaseException:
                shutil.rmtree(self._dir(job.id), ignore_errors=True)
                raise
            self._jobs[job.id] = job
            self._save(job)
            self._say(job, f"Created fine-tuning job {job.id} ({job.method} of {job.model} {job.base_version}, up to {job.estimated_tokens} training tokens).")
            return job.to_openai()

    def _pin(self, job: Job) -> None:
        """The job's own copy of its files, with their checksums: the upload may be deleted, the job trains on what it was given."""
        files = FileStore(self._cfg.store_root())
        folder = self._dir(job.id) / "data"
        folder.mkdir(parents=True, exist_ok=True)
        for role, file_id in (("training", job.training_file), ("validation", job.validation_file)):
            if not file_id:
                continue
            try:
                record, source = files.get(job.tenant, file_id), files.data_path(job.tenant, file_id)
            except MaasError:
                raise InvalidRequestError(f"No file `{file_id}` of yours to train on (it was deleted).", param=f"{role}_file", code="invalid_file") from None
            shutil.copyfile(source, folder / f"{role}.jsonl")
            job.pinned[role] = record.sha256

    def pinned_path(self, job: Job, role: str) -> Path:
        return self._dir(job.id) / "data" / f"{role}.jsonl"

    def _own(self, tenant: str | None, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise NotFoundError(f"No fine-tuning job `{job_id}`.", param="fine_tuning_job_id")
        return job

    def get(self, tenant: str | None, job_id: str) -> dict:
        with self._lock:
            return self._own(tenant, job_id).to_openai()

    def list(self, tenant: str | None, after: str | None = None, limit: int = 20) -> dict:
        with self._lock:
            jobs = sorted((j for j in self._jobs.values() if tenant is None or j.tenant == tenant), key=lambda j: (-j.created_ts, -j.created_at, j.id))
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return {"object": "list", "data": [j.to_openai() for j in jobs[:limit]], "has_more": len(jobs) > limit}

    def events(self, tenant: str | None, job_id: str, after: str | None = None, limit: int = 20) -> dict:
        with self._lock:
            job = self._own(tenant, job_id)
        events = [event_to_openai(job.id, i, e) for i, e in enumerate(self.report(job.id).events())][::-1]  # newest first, as OpenAI lists them
        if after is not None:
            ids = [e["id"] for e in events]
            events = events[ids.index(after) + 1 :] if after in ids else []
        return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}

    def checkpoints(self, tenant: str | None, job_id: str, limit: int = 10) -> dict:
        with self._lock:
            job = self._own(tenant, job_id)
        data = [checkpoint_to_openai(job, i, c) for i, c in enumerate(self.report(job.id).checkpoints())][::-1]
        return {"object": "list", "data": data[:limit], "has_more": len(data) > limit, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    def cancel(self, tenant: str | None, job_id: str) -> dict:
        """A queued job ends at once (nothing billed); a running one is stopped and billed for what it trained."""
        with self._lock:
            job = self._own(tenant, job_id)
            if job.status in TERMINAL:
                raise InvalidRequestError(f"The job is already {job.status}.", param="fine_tuning_job_id", code="job_not_cancellable")
            job.cancel_requested = True
            if job.status == "queued":
                self._finish(job, "cancelled", trained=0)
            else:
                self._save(job)
                self._say(job, "Cancelling: stopping the training job.")
                if job.ray_job_id:
                    self._cluster.stop(job.ray_job_id)
            return job.to_openai()

    # ---- the loop ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Watch running jobs, then start what fits; re-assert the holds of jobs that are not finished."""
        with self._lock:
            for job in [j for j in self._jobs.values() if j.status == "running"]:
                self._alone(job, self._watch)
            self._start_queued()
            if self._billing is not None:
                for job in self._jobs.values():
                    if job.status not in TERMINAL:
                        try:
                            self._billing.hold(job.id, job.tenant, job.reserved, self._period(job.created_at), job.key_id)
                        except Exception:  # the budget moved meanwhile: the hold it had stands (a refused hold is never dropped)
                            logger.debug("could not re-assert the hold of %s", job.id, exc_info=True)

    def _alone(self, job: Job, step: Callable[[Job], None]) -> None:
        """One job's step: whatever goes wrong fails that job alone (its tenant reads why), never the loop."""
        try:
            step(job)
        except Exception as exc:
            logger.exception("fine-tuning job %s failed in the queue", job.id)
            reason = exc.message if isinstance(exc, MaasError) else "The job could not be run on the cluster (an internal error; the operator's logs have the details)."
            try:
                self._finish(job, "failed", trained=self.report(job.id).trained_tokens(), error={"code": "job_start_failed", "message": reason, "param": None})
            except Exception:
                logger.exception("could not mark fine-tuning job %s failed", job.id)

    def _start_queued(self) -> None:
        queued = [j for j in self._jobs.values() if j.status == "queued"]
        if not queued:
            return
        now = self._clock()
        try:
            free = self._cluster.free_cpus()
        except Exception as exc:
            for job in queued:
                self._wait(job, f"The cluster's resources cannot be read now ({exc}).", "warn")
            return
        starting = sum(j.workers * j.cpus_per_worker for j in self._jobs.values() if j.status == "running" and j.started_at and now - j.started_at < STARTING_S)
        decision = decide_starts(list(self._jobs.values()), free - starting, self._running_limit, self._ft.max_workers, self._ft.cpus_per_worker, self._ft.min_cpus_per_worker)
        for job_id, reason in decision.waiting.items():
            self._wait(self._jobs[job_id], reason)
        for job_id, workers, cpus in decision.start:
            self._alone(self._jobs[job_id], lambda job: self._start(job, workers, cpus))

    def _wait(self, job: Job, reason: str, level: str = "info") -> None:
        """Keep the job queued, saying why (once per new reason)."""
        if job.queue_reason != reason:
            job.queue_reason = reason
            self._save(job)
            self._say(job, reason, level)

    def _plan(self, tenant: str) -> Plan:
        return self._billing.plan(tenant) if self._billing is not None else Plan()

    def _running_limit(self, tenant: str) -> int:
        own = self._plan(tenant).fine_tune_jobs
        return self._ft.running_jobs_per_tenant if own is None else own

    def _start(self, job: Job, workers: int, cpus: float) -> None:
        config_path = self._dir(job.id) / "train.yaml"
        config_path.write_text(yaml.safe_dump(self.train_config(job, workers, cpus), sort_keys=False))
        try:
            job.ray_job_id = self._cluster.submit(job.id, str(config_path))
        except Exception as exc:
            self._wait(job, f"The training job could not be submitted ({exc}); retrying.", "warn")
            return
        job.status, job.started_at, job.queue_reason, job.workers, job.cpus_per_worker = "running", int(self._clock()), None, workers, cpus
        self._save(job)
        self._say(job, f"Started as Ray job {job.ray_job_id}: {workers} worker(s) × {cpus} CPU.")

    def train_config(self, job: Job, workers: int, cpus: float) -> dict[str, Any]:
        """The `training.finetune` config the job runs (`python -m training.finetune --config train.yaml`)."""
        ft = self._ft
        lr = (ft.lora_learning_rate if job.method == "lora" else ft.full_learning_rate) * job.learning_rate_multiplier
        data: dict[str, Any] = {"path": str(self._data_path(job, "training")), "max_seq_len": ft.max_seq_len, "eval_fraction": 0.1, "sha256": job.pinned.get("training")}
        if job.validation_file:
            data.update(eval_path=str(self._data_path(job, "validation")), eval_fraction=0.0)
        return {
            "run_name": job.id,
            "base": {"name": job.model, "version": job.base_version, "init": "pretrained"},
            "method": {"type": job.method, "lora": {"rank": job.lora_rank, "alpha": job.lora_alpha}},
            "data": data,
            "optim": {"epochs": job.n_epochs, "max_steps": ft.max_steps, "batch_size_per_worker": max(1, job.batch_size // workers), "learning_rate": lr, "warmup_steps": 1, "seed": job.seed},
            "scaling": {"num_workers": workers, "cpus_per_worker": cpus, "torch_threads": 1, "use_gpu": ft.use_gpu, "fit": False},  # sized by the queue
            "checkpoint": {"every_steps": 5, "num_to_keep": 2, "max_failures": 1, "storage_path": str(self._dir(job.id) / "runs")},
            "output": {
                "name": job.fine_tuned_model if job.method == "lora" else job.model,
                "publish": True,
                "report_dir": str(self.report(job.id).folder),
                "metadata": {"tenant": job.tenant, "fine_tuning_job": job.id, "training_file": job.training_file},
            },
            "model_store": str(self._cfg.store_root()),
        }

    def _data_path(self, job: Job, role: str) -> Path:
        """The job's pinned copy (a job created before pinning existed reads the upload, as it did)."""
        pinned = self.pinned_path(job, role)
        if pinned.is_file():
            return pinned
        return FileStore(self._cfg.store_root()).data_path(job.tenant, job.training_file if role == "training" else job.validation_file or "")

    def _watch(self, job: Job) -> None:
        if not job.ray_job_id:
            return
        try:
            state, message = self._cluster.status(job.ray_job_id)
        except Exception as exc:
            logger.warning("cannot read the status of %s (%s): %s", job.id, job.ray_job_id, exc)
            return
        report = self.report(job.id)
        if state == "SUCCEEDED":
            result = report.result() or {}
            if result.get("status") == "succeeded":
                if job.method == "lora" and not self._adapters_served(job):
                    return  # the job succeeds once its model can be called: looked at again next tick
                if job.method != "lora":  # a full fine-tune is the base model's next version
                    job.fine_tuned_model = f"{job.model}@{result.get('version')}"
                self._finish(job, "succeeded", trained=int(result.get("trained_tokens", 0)))
            else:
                self._finish(job, "failed", trained=report.trained_tokens(), error={"code": "no_result", "message": "The training job ended without publishing a model.", "param": None})
        elif state == "STOPPED" or (state == "FAILED" and job.cancel_requested):
            self._finish(job, "cancelled", trained=report.trained_tokens())
        elif state == "FAILED":
            result = report.result() or {}  # its `error` is written for the tenant (training.finetune); Ray's message and log are the operator's
            if message:
                logger.warning("fine-tuning job %s (%s) failed: %s", job.id, job.ray_job_id, message[-2000:])
            error = result.get("error") or "The training job failed on the cluster (an internal error; the operator's logs have the details)."
            self._finish(job, "failed", trained=report.trained_tokens(), error={"code": "training_failed", "message": str(error)[:2000], "param": None})

    def _adapters_served(self, job: Job) -> bool:
        """Whether the base model's engines serve adapters; if not, they are being turned on (said once in the job's
        events) and this is asked again next tick. Past `ADAPTERS_WAIT_S` (or on errors that long) the job succeeds
        anyway, its adapter published, with a warning; why is in the operator's log."""
        if self._serving is None:
            return True
        try:
            served = self._serving.adapters_served(job.model)
        except Exception:
            logger.exception("could not turn on LoRA adapters for %s (job %s); trying again", job.model, job.id)
            served = False
        if served:
            self._turning_on.pop(job.id, None)
            return True
        if job.id not in self._turning_on:
            self._turning_on[job.id] = self._clock()
            self._say(job, f"Training done; {job.model}'s engines are restarting to serve fine-tuned adapters (the first one for this model).")
        if self._clock() - self._turning_on[job.id] > ADAPTERS_WAIT_S:
            self._turning_on.pop(job.id, None)
            self._say(job, "The engines did not come back with adapter support in time; the model is published and will answer once they do.", "warning")
            return True
        return False

    def _finish(self, job: Job, status: str, trained: int = 0, error: dict | None = None) -> None:
        job.status, job.finished_at, job.error = status, int(self._clock()), error
        job.trained_tokens = trained
        shutil.rmtree(self._dir(job.id) / "data", ignore_errors=True)  # its pinned files: the lineage keeps their checksums
        if self._billing is not None and not job.billed:
            if trained > 0:  # what it trained, however it ended
                billed_as = job.fine_tuned_model if job.method == "lora" else job.model
                self._billing.record_training(job.id, job.tenant, job.key_id, billed_as, trained, Decimal(job.training_price), self._clock())
            else:
                self._billing.release(job.id)
            job.billed = True
        self._save(job)
        detail = {"succeeded": f"The job succeeded: {job.fine_tuned_model} is ready ({trained} tokens trained).", "cancelled": f"The job was cancelled ({trained} tokens trained, billed)."}
        self._say(job, detail.get(status, f"The job failed ({trained} tokens trained, billed): {(error or {}).get('message', '')}"), "info" if status != "failed" else "error")
