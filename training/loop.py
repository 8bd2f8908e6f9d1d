"""The per-worker supervised fine-tuning loop that Ray Train runs on every rank (DDP over gloo on CPU, nccl on GPU).

Each rank reads its shard of the encoded dataset with Ray Data, steps an AdamW
optimizer, and every `checkpoint.every_steps` rank 0 writes an HF folder (plus
optimizer and step) reported through `ray.train.report`.  A restarted worker
group resumes from `ray.train.get_checkpoint()`.  The final checkpoint carries
the held-out loss before and after training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from common.run_reports import RunReport
from training.config import TrainConfig
from training.data import IGNORE_INDEX, collate, lr_at

logger = logging.getLogger("maas.train")

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"


def build_model(cfg: TrainConfig, base_path: str) -> Any:
    """The model to train: the base version's weights, or a fresh one shaped by `random_config`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.base.init == "pretrained":
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = AutoConfig.from_pretrained(base_path)
    for key, value in cfg.base.random_config.items():
        setattr(config, key, value)
    if hasattr(config, "head_dim") and "head_dim" not in cfg.base.random_config:
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(cfg.optim.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def with_adapter(cfg: TrainConfig, model: Any, adapter_dir: str | None = None) -> Any:
    """With method=lora: `model` frozen under a trainable LoRA adapter (a new one, or the one saved in `adapter_dir`); else `model`."""
    if cfg.method.type != "lora":
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    lora = cfg.method.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _collate_class() -> type:
    """A Ray Data NumpyBatchCollateFn that pads a batch of encoded rows into tensors on the train device."""
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PadCollate(NumpyBatchCollateFn):
        def __init__(self, pad_id: int, device: Any):
            self.pad_id, self.device = pad_id, device

        def __call__(self, batch: dict) -> dict:
            rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"])]
            return {k: torch.tensor(v, dtype=torch.long, device=self.device) for k, v in collate(rows, self.pad_id).items()}

    return PadCollate


def _batches(shard: Any, batch_size: int, pad_id: int, device: Any, seed: int | None) -> Iterator[dict]:
    kwargs: dict[str, Any] = {"batch_size": batch_size, "collate_fn": _collate_class()(pad_id, device)}
    if seed is not None:
        kwargs.update(local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed)
    return iter(shard.iter_torch_batches(**kwargs))


def _all_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def evaluate(model: Any, shard: Any, batch_size: int, pad_id: int, device: Any) -> dict[str, float]:
    """Held-out loss and perplexity over every rank's eval shard (token-weighted, all-reduced)."""
    import torch

    model.eval()
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for batch in _batches(shard, batch_size, pad_id, device, None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            total += loss.item()
            tokens += (labels != IGNORE_INDEX).sum().item()
    model.train()
    total, tokens = _all_sum([total, tokens])
    loss = total / tokens if tokens else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on each worker; `loop_config` = {"train": TrainConfig dump, "base_path": str}."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.util.metrics import Gauge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.basicConfig(level=os.environ.get("MAAS_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.model_validate(loop_config["train"])
    base_path = loop_config["base_path"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    start_step, ckpt_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            if cfg.method.type == "lora":  # the checkpoint is the adapter: the base under it is the job's base
                model = with_adapter(cfg, build_model(cfg, base_path), d)
            else:
                model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            ckpt_state = json.loads((Path(d) / STATE_FILE).read_text())
            optim_state = torch.load(Path(d) / OPTIMIZER_FILE, weights_only=True) if (Path(d) / OPTIMIZER_FILE).exists() else None
        start_step = ckpt_state["step"]
        if rank == 0:
            logger.info("resuming from the checkpoint at step %d", start_step)
    else:
        model, optim_state = with_adapter(cfg, build_model(cfg, base_path)), None
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    report = RunReport(cfg.output.report_dir) if cfg.output.report_dir and rank == 0 else None
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    bs = cfg.optim.batch_size_per_worker
    before = ckpt_state["eval_before"] if ckpt_state else evaluate(raw_model, eval_shard, bs, pad_id, device)
    if rank == 0:
        logger.info("world size %d, %d threads per worker; held-out loss before training %.4f", world, threads, before["eval_loss"])
        trainable_n = sum(p.numel() for p in trainable)
        logger.info("%s: %d trainable parameters", cfg.method.type, trainable_n)
    if report is not None and checkpoint is None:
        report.event("eval", step=0, **before)
    gauges = {name: Gauge(f"maas_train_{name}", description=desc, tag_keys=("run",)) for name, desc in (("loss", "Training loss (mean over ranks)."), ("tokens_per_second", "Training tokens per second, all ranks."), ("step", "Optimizer step."))}
    tags = {"run": ctx.get_experiment_name()}

    def save(step: int, metrics: dict, final: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="maas-ckpt-") as d:
            ckpt = None
            if rank == 0:
                raw_model.save_pretrained(d, safe_serialization=True)
                tokenizer.save_pretrained(d)
                if not final:
                    torch.save(optimizer.state_dict(), Path(d) / OPTIMIZER_FILE)
                (Path(d) / STATE_FILE).write_text(json.dumps({"step": step, "eval_before": before, "final": final, **metrics}))
                ckpt = ray.train.Checkpoint.from_directory(d)
            name = f"step_{step:06d}{'_final' if final else ''}"
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
            if report is not None:
                report.checkpoint(step, name, {k: metrics[k] for k in ("loss", "eval_loss", "trained_tokens") if k in metrics})

    step, epoch = start_step, 0
    timed_tokens, timed_s = 0.0, 0.0  # steady state: every step after this attempt's first
    trained = int(ckpt_state.get("trained_tokens", 0)) if ckpt_state else 0  # every rank's tokens, every step so far
    metrics: dict = {"step": step, "resumed_from_step": start_step, "trained_tokens": trained}
    model.train()
    while step < cfg.optim.max_steps:
        for batch in _batches(train_shard, bs, pad_id, device, cfg.optim.seed + epoch + 1000 * start_step):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim.max_steps, cfg.optim.warmup_steps, cfg.optim.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, tokens = _all_sum([loss.item(), float(batch["attention_mask"].sum().item())])
            elapsed = time.perf_counter() - t0
            if step > start_step + 1:
                timed_tokens, timed_s = timed_tokens + tokens, timed_s + elapsed
            trained += int(tokens)
            metrics = {"step": step, "epoch": epoch, "world_size": world, "loss": loss_sum / world, "lr": lr, "tokens": int(tokens), "tokens_per_s": tokens / elapsed, "tokens_per_s_mean": timed_tokens / timed_s if timed_s else tokens / elapsed, "resumed_from_step": start_step, "trained_tokens": trained}
            if report is not None:
                report.event("step", step=step, max_steps=cfg.optim.max_steps, epoch=epoch, loss=metrics["loss"], lr=lr, tokens=int(tokens), trained_tokens=trained)
            if rank == 0:
                logger.info("step %d/%d  loss %.4f  tokens/s %.0f  lr %.2e", step, cfg.optim.max_steps, metrics["loss"], metrics["tokens_per_s"], lr)
                gauges["loss"].set(metrics["loss"], tags)
                gauges["tokens_per_second"].set(metrics["tokens_per_s"], tags)
                gauges["step"].set(step, tags)
            if step >= cfg.optim.max_steps:
                break
            if step % cfg.checkpoint.every_steps == 0:
                save(step, metrics, final=False)
        epoch += 1
    after = evaluate(raw_model, eval_shard, bs, pad_id, device)
    final = {**metrics, **after, "eval_loss_before": before["eval_loss"], "perplexity_before": before["perplexity"]}
    if rank == 0:
        logger.info("done: held-out loss %.4f -> %.4f (perplexity %.2f -> %.2f)", before["eval_loss"], after["eval_loss"], before["perplexity"], after["perplexity"])
    if report is not None:
        report.event("eval", step=step, **after)
    save(step, final, final=True)
