"""Fine-tuning jobs as data: the job record, OpenAI's shapes of it, and the queue's decisions. No Ray here.

A job is `queued` until the cluster has room beside serving and its tenant is under its plan's
limit of running jobs; `decide_starts` says which jobs start now and, for every other queued job,
what it waits for (shown as the job's `queue_reason` and as an event). Jobs start in the order they
were created; a job held back by its own tenant's limit never holds back another tenant's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
from typing import Callable

from common.resources import DATA_CPUS, sizing

__all__ = ["DATA_CPUS", "sizing"]  # re-exported: the queue sizes jobs by the same rule as the job itself

TERMINAL = ("succeeded", "failed", "cancelled")
TEMPLATE_TOKENS = 16  # the chat template's tokens around one message, at most (SmolLM2's is 5)


@dataclass
class Job:
    id: str
    tenant: str
    key_id: str
    model: str  # the base model
    base_version: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    method: str  # lora | full
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    lora_rank: int
    lora_alpha: float
    seed: int
    created_at: int
    fine_tuned_model: str  # the id it will be served as (shown once it has succeeded)
    estimated_tokens: int
    training_price: str  # per 1M trained tokens, at creation (Decimal as text)
    status: str = "queued"
    queue_reason: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    error: dict | None = None
    ray_job_id: str | None = None
    workers: int = 0
    cpus_per_worker: float = 0.0
    cancel_requested: bool = False
    billed: bool = False
    metadata: dict = field(default_factory=dict)
    created_ts: float = 0.0  # exact creation time: the queue's order (`created_at` is OpenAI's whole seconds)
    pinned: dict = field(default_factory=dict)  # "training" / "validation" -> sha256 of the job's own copy of that file

    @property
    def reserved(self) -> Decimal:
        """The most this job can cost: its estimated tokens at its training price."""
        return training_cost(self.estimated_tokens, Decimal(self.training_price))

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "Job":
        known = {f.name for f in fields(Job)}
        return Job(**{k: v for k, v in data.items() if k in known})

    def to_openai(self) -> dict:
        """OpenAI's FineTuningJob object (with `queue_reason` and the method's LoRA settings as extras)."""
        hyper = {"n_epochs": self.n_epochs, "batch_size": self.batch_size, "learning_rate_multiplier": self.learning_rate_multiplier}
        method = {"type": self.method, self.method: {"hyperparameters": hyper, **({"rank": self.lora_rank, "alpha": self.lora_alpha} if self.method == "lora" else {})}}
        return {
            "id": self.id, "object": "fine_tuning.job", "created_at": self.created_at, "finished_at": self.finished_at, "model": self.model,
            "fine_tuned_model": self.fine_tuned_model if self.status == "succeeded" else None, "organization_id": self.tenant, "result_files": [],
            "status": self.status, "validation_file": self.validation_file, "training_file": self.training_file, "hyperparameters": hyper,
            "trained_tokens": self.trained_tokens, "error": self.error, "seed": self.seed, "estimated_finish": None, "integrations": [],
            "user_provided_suffix": self.suffix, "method": method, "metadata": self.metadata or None, "queue_reason": self.queue_reason,
        }  # fmt: skip


def training_cost(tokens: int, price_per_1m: Decimal) -> Decimal:
    return Decimal(tokens) * price_per_1m / Decimal(1_000_000)


def estimate_tokens(content_bytes: int, messages: int, epochs: int) -> int:
    """An upper bound on the tokens a job trains: a byte-level BPE token is at least one UTF-8 byte (a character of
    non-ASCII text is several), plus the template around each message."""
    return (content_bytes + TEMPLATE_TOKENS * messages) * epochs


@dataclass(frozen=True)
class StartDecision:
    start: list[tuple[str, int, float]]  # (job id, workers, cpus per worker)
    waiting: dict[str, str]  # queued job id -> what it waits for


def decide_starts(
    jobs: list[Job], free_cpus: float, running_limit: Callable[[str], int], max_workers: int, cpus_per_worker: float, min_cpus_per_worker: float
) -> StartDecision:
    running: dict[str, int] = {}
    for j in jobs:
        if j.status == "running":
            running[j.tenant] = running.get(j.tenant, 0) + 1
    start, waiting = [], {}
    blocked = False  # an earlier job is waiting for room: later ones wait behind it (first come, first served)
    for j in sorted((j for j in jobs if j.status == "queued" and not j.cancel_requested), key=lambda j: (j.created_ts, j.created_at, j.id)):
        limit = running_limit(j.tenant)
        if running.get(j.tenant, 0) >= limit:
            waiting[j.id] = f"Waiting for one of this tenant's running fine-tuning jobs to finish (the plan allows {limit} at a time)."
            continue
        size = None if blocked else sizing(free_cpus, max_workers, cpus_per_worker, min_cpus_per_worker)
        if size is None:
            blocked = True
            waiting[j.id] = (
                f"Waiting for CPUs: a job needs at least {min_cpus_per_worker + DATA_CPUS:.1f} free beside serving and other jobs; "
                f"{max(free_cpus, 0):.1f} are free."
            )
            continue
        start.append((j.id, *size))
        free_cpus -= size[0] * size[1] + DATA_CPUS
        running[j.tenant] = running.get(j.tenant, 0) + 1
    return StartDecision(start, waiting)


def event_to_openai(job_id: str, index: int, event: dict) -> dict:
    """A run report's event (`common.run_reports`) or the manager's own message as OpenAI's FineTuningJobEvent."""
    kind = event.get("type")
    if kind == "step":
        message = f"Step {event['step']}/{event.get('max_steps', '?')}: training loss={event['loss']:.4f}"
        data = {"step": event["step"], "train_loss": event["loss"], "total_steps": event.get("max_steps"), "trained_tokens": event.get("trained_tokens")}
        return _event(job_id, index, event, "info", message, data, "metrics")
    if kind == "eval":
        message = f"Held-out loss after step {event.get('step', 0)}: {event['eval_loss']:.4f}"
        return _event(job_id, index, event, "info", message, {"step": event.get("step", 0), "valid_loss": event["eval_loss"]}, "metrics")
    return _event(job_id, index, event, event.get("level", "info"), event.get("message", ""), {}, "message")


def _event(job_id: str, index: int, event: dict, level: str, message: str, data: dict, kind: str) -> dict:
    return {
        "id": f"ftevent-{job_id.removeprefix('ftjob-')[:12]}-{index:06d}", "object": "fine_tuning.job.event", "created_at": int(event.get("created_at", 0)),
        "level": level, "message": message, "data": data, "type": kind,
    }  # fmt: skip


def checkpoint_to_openai(job: Job, index: int, checkpoint: dict) -> dict:
    metrics = checkpoint.get("metrics", {})
    return {
        "id": f"ftckpt-{job.id.removeprefix('ftjob-')[:12]}-{index:04d}", "object": "fine_tuning.job.checkpoint", "created_at": int(checkpoint.get("created_at", 0)),
        "fine_tuned_model_checkpoint": f"{job.fine_tuned_model}:ckpt-step-{checkpoint['step']}", "fine_tuning_job_id": job.id, "step_number": checkpoint["step"],
        "metrics": {"step": checkpoint["step"], "train_loss": metrics.get("loss"), "valid_loss": metrics.get("eval_loss")},
    }  # fmt: skip
