"""Run a fine-tuning job: `python -m training.finetune --config training/configs/pirate.yaml`.

Works the same as a local run or as a Ray job (`ray job submit --working-dir . -- python -m training.finetune ...`):
it connects to the cluster it finds (RAY_ADDRESS, or a new local one), reads and encodes
the dataset with Ray Data, runs a Ray Train `TorchTrainer`, and publishes the final
checkpoint as a new version in the model store with its lineage and eval metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from common import envs
from common.model_store import ModelVersion, open_store
from common.resources import DATA_CPUS, sizing
from common.run_reports import RunReport
from common.runtime import repo_path
from training.config import TrainConfig, load_train_config
from training.data import encode_chat, file_sha256, is_eval, read_chats
from training.loop import OPTIMIZER_FILE, STATE_FILE, train_loop_per_worker

logger = logging.getLogger("maas.train")


@dataclass(frozen=True)
class RunResult:
    run_name: str
    storage_path: str
    checkpoint_path: str
    metrics: dict[str, Any]
    version: str | None  # the model version published, when registering


class _Encoder:
    """Ray Data map_batches callable: one tokenizer per actor, rows of messages -> input ids, labels, split."""

    def __init__(self, tokenizer_path: str, max_seq_len: int, eval_fraction: float, seed: int, split: str | None = None):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self._max, self._frac, self._seed, self._split = max_seq_len, eval_fraction, seed, split

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "split": []}
        for raw in batch["messages"]:
            messages = [{"role": m["role"], "content": m["content"]} for m in raw]
            enc = encode_chat(self._tok, messages, self._max)
            if enc is not None:
                out["input_ids"].append(enc.input_ids)
                out["labels"].append(enc.labels)
                out["split"].append(self._split or ("eval" if is_eval(messages, self._frac, self._seed) else "train"))
        return out


def build_datasets(cfg: TrainConfig, tokenizer_path: str) -> dict[str, Any]:
    """Read the JSONL with Ray Data, encode it once (materialized), and split it into train and eval."""
    import ray.data

    small = {"num_cpus": 0.1}  # Ray Train workers hold most CPUs of a small node
    ray.data.DataContext.get_current().enable_progress_bars = False  # job logs show the training steps instead
    def encoded(path: str, split: str | None) -> Any:
        args = (tokenizer_path, cfg.data.max_seq_len, cfg.data.eval_fraction, cfg.optim.seed, split)
        return ray.data.read_json(path, ray_remote_args=small).map_batches(_Encoder, fn_constructor_args=args, batch_size=64, concurrency=1, **small)

    if cfg.data.eval_path:  # a validation file of its own: every example of the data is trained on
        ds = encoded(str(cfg.data_path()), "train").union(encoded(str(repo_path(cfg.data.eval_path)), "eval")).materialize()
    else:
        ds = encoded(str(cfg.data_path()), None).materialize()
    train = ds.filter(lambda r: r["split"] == "train", **small).drop_columns(["split"]).materialize()
    evals = ds.filter(lambda r: r["split"] == "eval", **small).drop_columns(["split"]).materialize()
    return {"train": train, "eval": evals}


def storage_path(cfg: TrainConfig) -> str:
    raw = envs.MAAS_TRAIN_STORAGE or cfg.checkpoint.storage_path
    return raw if "://" in raw else str(Path(raw).expanduser().resolve())


def store_root(cfg: TrainConfig) -> Path:
    if cfg.model_store:
        return Path(cfg.model_store).expanduser()
    from common.config import load_config

    return load_config().store_root()


def run(cfg: TrainConfig) -> RunResult:
    """Train and (by default) register; Ray must be initialised (or is started locally)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    data_path = cfg.data_path()
    dataset_sha256 = file_sha256(data_path)  # the data trained on is the data recorded (and paid for): taken before training
    if cfg.data.sha256 and dataset_sha256 != cfg.data.sha256:
        raise ValueError(f"The training data changed after the job was created (sha256 {dataset_sha256[:12]}…, expected {cfg.data.sha256[:12]}…).")
    store = open_store(store_root(cfg))
    base = store.resolve(cfg.base.name, cfg.base.version)
    chats = read_chats(data_path)  # fail fast, naming the bad line, before any worker starts
    if cfg.data.eval_path:
        read_chats(repo_path(cfg.data.eval_path))
    run_name = cfg.run_name or f"{cfg.output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    logger.info("fine-tuning %s/%s on %s (%d examples) as run %s", base.name, base.version, data_path, len(chats), run_name)
    if not ray.is_initialized():
        from common.runtime import use_local_env

        # Inside `ray job submit` RAY_ADDRESS names the cluster; otherwise join a running one or start one (loopback only).
        use_local_env()
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    datasets = build_datasets(cfg, str(base.path))
    n_train = datasets["train"].count()
    logger.info("dataset encoded: %d train / %d eval examples", n_train, datasets["eval"].count())
    cfg = steps_for_epochs(fit_to_cluster(cfg, lambda: float(ray.available_resources().get("CPU", 0.0))), n_train)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "base_path": str(base.path)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker={**resources, **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    metrics = dict(result.metrics or {})
    version = None
    if cfg.output.publish:
        version = register(cfg, store, base, result.checkpoint.path, run_name, dataset_sha256, len(chats), metrics).version
    if cfg.output.report_dir:
        RunReport(cfg.output.report_dir).finish(
            status="succeeded", trained_tokens=int(metrics.get("trained_tokens", 0)), model=cfg.output_name, version=version, run=run_name,
            metrics={k: metrics[k] for k in ("loss", "eval_loss", "eval_loss_before", "step") if k in metrics},
        )  # fmt: skip
    return RunResult(run_name, storage_path(cfg), result.checkpoint.path, metrics, version)


def fit_to_cluster(cfg: TrainConfig, free_cpus: Callable[[], float], sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> TrainConfig:
    """With `scaling.fit` (and on CPUs): the worker group resized to what is free now (`common.resources.sizing`).

    While not even one smallest worker fits, wait and say so every 30 s (Ray Train itself would retry
    the worker group silently); after `scaling.wait_s`, fail with the numbers.
    """
    sc = cfg.scaling
    if not sc.fit or sc.use_gpu:
        return cfg
    deadline, told = clock() + sc.wait_s, -float("inf")
    wanted = (sc.num_workers, sc.cpus_per_worker)
    while True:
        free = free_cpus()
        for _ in range(3):  # the dataset's encoding actors give their CPUs back a moment after it is materialized
            if sizing(free + DATA_CPUS, sc.num_workers, sc.cpus_per_worker, sc.min_cpus_per_worker) == wanted:
                break
            sleep(1.0)
            free = max(free, free_cpus())
        size = sizing(free + DATA_CPUS, sc.num_workers, sc.cpus_per_worker, sc.min_cpus_per_worker)  # Ray Data has read the data already
        if size is not None:
            if size != (sc.num_workers, sc.cpus_per_worker):
                logger.info("%.1f CPUs free: %d worker(s) × %.2f CPU (asked for %d × %.2f)", free, *size, sc.num_workers, sc.cpus_per_worker)
            return cfg.model_copy(update={"scaling": sc.model_copy(update={"num_workers": size[0], "cpus_per_worker": size[1]})})
        if clock() > deadline:
            raise RuntimeError(f"Not enough free CPUs for one training worker of {sc.min_cpus_per_worker} CPU after {sc.wait_s:.0f}s ({free:.1f} free); stop something or add a node.")
        if clock() - told >= 30:
            logger.warning("waiting for CPUs: one training worker needs %.1f, %.1f are free (serving and other jobs hold the rest)", sc.min_cpus_per_worker, free)
            told = clock()
        sleep(2.0)


def steps_for_epochs(cfg: TrainConfig, train_examples: int) -> TrainConfig:
    """With `optim.epochs`: the steps that pass over the examples that many times (at most `max_steps`), warm-up kept below them."""
    if cfg.optim.epochs is None:
        return cfg
    per_step = cfg.optim.batch_size_per_worker * cfg.scaling.num_workers
    steps = max(1, min(cfg.optim.max_steps, math.ceil(train_examples / per_step) * cfg.optim.epochs))
    optim = cfg.optim.model_copy(update={"max_steps": steps, "warmup_steps": min(cfg.optim.warmup_steps, steps // 10)})
    logger.info("%d epochs of %d examples: %d steps", cfg.optim.epochs, train_examples, steps)
    return cfg.model_copy(update={"optim": optim})


def register(cfg: TrainConfig, store: Any, base: ModelVersion, checkpoint_path: str, run_name: str, dataset_sha256: str, examples: int, metrics: dict) -> ModelVersion:
    """Publish the final checkpoint's HF folder as the next version (atomically: staged, then renamed)."""
    metadata = {
        **cfg.output.metadata,
        "method": cfg.method.type,
        **({"adapter": {"base": {"name": base.name, "version": base.version}, "rank": cfg.method.lora.rank, "alpha": cfg.method.lora.alpha}} if cfg.method.type == "lora" else {}),
        "source": {"kind": "finetune", "run": run_name, "checkpoint": checkpoint_path},
        "lineage": {
            "base": {"name": base.name, "version": base.version},
            "dataset": {"path": cfg.data.path, "sha256": dataset_sha256, "examples": examples},
            "run": {"name": run_name, **_job_ids()},
            "config": cfg.model_dump(mode="json"),
        },
        "eval": {k: metrics[k] for k in ("eval_loss", "perplexity", "eval_loss_before", "perplexity_before", "eval_tokens") if k in metrics},
        "train": {k: metrics[k] for k in ("step", "loss", "tokens_per_s") if k in metrics},
    }
    local = _local_dir(checkpoint_path)
    mv = store.publish(cfg.output_name, local, metadata, ignore=(OPTIMIZER_FILE, STATE_FILE))
    logger.info("registered %s/%s (held-out loss %s -> %s)", mv.name, mv.version, metadata["eval"].get("eval_loss_before"), metadata["eval"].get("eval_loss"))
    return mv


def _job_ids() -> dict[str, str | None]:
    """The Ray job this run belongs to, and its `ray job submit` id when it was submitted."""
    import ray

    submission = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata", {}).get("job_submission_id")
    return {"ray_job_id": ray.get_runtime_context().get_job_id() if ray.is_initialized() else None, "submission_id": submission}


def _local_dir(path: str) -> Path:
    if "://" in path:  # a cloud URI: download once
        import tempfile

        import ray.train

        return Path(ray.train.Checkpoint(path).to_directory(tempfile.mkdtemp(prefix="maas-publish-")))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="Training config YAML (see training/configs/).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a field, e.g. --set optim.max_steps=10 (YAML value).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=envs.MAAS_LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = load_train_config(args.config, _overrides(args.set))
    except Exception as exc:
        logger.error("invalid training config %s: %s", args.config, exc)
        return 2
    try:
        result = run(cfg)
    except Exception as exc:
        logger.error("fine-tuning failed: %s", exc, exc_info=not isinstance(exc, ValueError))
        if cfg.output.report_dir:  # read by the job's tenant: the reason when it is about the job's own data or settings, else no internals
            public = str(exc) if isinstance(exc, ValueError) else "The training run failed on the cluster (an internal error; the operator's logs have the details)."
            report = RunReport(cfg.output.report_dir)
            report.finish(status="failed", error=public[:2000], trained_tokens=report.trained_tokens())
        return 1
    logger.info("result %s", json.dumps(asdict(result), default=str))
    return 0


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


if __name__ == "__main__":
    sys.exit(main())
