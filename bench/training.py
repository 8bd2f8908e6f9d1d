"""Training benchmark: the Ray Train job against a plain single-process PyTorch loop, and `ray job submit` to first step.

1. Throughput: the same model, data, global batch and cores, side by side:
   - baseline: one Python process, one model, torch using every core, no Ray;
   - ray-maas: `training.finetune.run` — Ray Train TorchTrainer, N DDP workers on gloo, data
     read and sharded by Ray Data, one thread per worker.
   Both exclude their first (warm-up) step; the figure is training tokens (non-padding) per second.
2. Start-up: `ray job submit` of the tiny config to a running local head, time until the job
   logs its first optimizer step, and until it finishes (registered version included).

    python -m bench.training [--model real|tiny|both] [--steps 8] [--skip-job]

Writes bench/out/training.json.  Each part starts and stops its own local Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.runtime import REPO_ROOT

logger = logging.getLogger("bench.training")
OUT = REPO_ROOT / "bench" / "out"
CONFIGS = {"real": REPO_ROOT / "training/configs/pirate.yaml", "tiny": REPO_ROOT / "training/configs/tiny.yaml"}


def _cfg(kind: str, steps: int, storage: str):
    from training.config import load_train_config

    return load_train_config(CONFIGS[kind], {"optim": {"max_steps": steps, "warmup_steps": 1}, "checkpoint": {"every_steps": 10_000, "storage_path": storage}, "output": {"publish": False}})


def plain_loop(kind: str, steps: int) -> dict:
    """The baseline: one process, every core, the same encoded data and global batch."""
    import torch

    from common.config import load_config
    from common.model_store import open_store
    from training.data import collate, encode_chat, is_eval, lr_at, read_chats
    from training.loop import build_model
    from transformers import AutoTokenizer

    cfg = _cfg(kind, steps, tempfile.mkdtemp())
    base = open_store(load_config().store_root()).resolve(cfg.base.name, cfg.base.version)
    tok = AutoTokenizer.from_pretrained(base.path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [e for c in read_chats(cfg.data_path()) if not is_eval(c, cfg.data.eval_fraction, cfg.optim.seed) and (e := encode_chat(tok, c, cfg.data.max_seq_len))]
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(cfg, str(base.path))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.learning_rate)
    batch_size = cfg.optim.batch_size_per_worker * cfg.scaling.num_workers
    tokens = seconds = 0.0
    for step in range(steps):
        chunk = [rows[(step * batch_size + i) % len(rows)] for i in range(batch_size)]
        batch = {k: torch.tensor(v) for k, v in collate(chunk, pad).items()}
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1, cfg.optim.learning_rate)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        if step > 0:
            tokens, seconds = tokens + batch["attention_mask"].sum().item(), seconds + elapsed
        logger.info("plain %s step %d/%d loss %.3f %.1fs", kind, step + 1, steps, loss.item(), elapsed)
    return {"tokens_per_s": tokens / seconds, "threads": torch.get_num_threads(), "global_batch": batch_size}


def ray_train(kind: str, steps: int) -> dict:
    from cluster import local
    from training.finetune import run

    local.start_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        cfg = _cfg(kind, steps, tempfile.mkdtemp())
        t0 = time.monotonic()
        result = run(cfg)
        return {
            "tokens_per_s": result.metrics["tokens_per_s_mean"],
            "workers": cfg.scaling.num_workers,
            "global_batch": cfg.optim.batch_size_per_worker * cfg.scaling.num_workers,
            "run_wall_s": time.monotonic() - t0,
        }
    finally:
        local.stop()


def job_submit_to_first_step() -> dict:
    """`ray job submit` of the tiny config to a running local head: seconds to the first step and to the end."""
    from cluster import local
    from common.runtime import free_port

    port = free_port()
    store = Path(tempfile.mkdtemp(prefix="bench-store-"))
    from common.config import load_config
    from common.model_store import open_store

    open_store(store).link_version(open_store(load_config().store_root()).resolve("SmolLM2-135M-Instruct"))
    os.environ.update(MAAS_MODEL_STORE=str(store), MAAS_TRAIN_STORAGE=tempfile.mkdtemp())
    local.start_ray(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_port=port)
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", ".", "--",
             "python", "-m", "training.finetune", "--config", "training/configs/tiny.yaml", "--set", "optim.max_steps=10"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        first = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if first is None and "step 1/" in line:
                first = time.monotonic() - t0
        rc = proc.wait()
        return {"first_step_s": first, "total_s": time.monotonic() - t0, "rc": rc}
    finally:
        local.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["real", "tiny", "both"], default="both")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-job", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"cpus": os.cpu_count()}
    for kind in (["real", "tiny"] if args.model == "both" else [args.model]):
        plain = plain_loop(kind, args.steps)
        ray = ray_train(kind, args.steps)
        results[kind] = {"plain": plain, "ray_train": ray, "ratio": ray["tokens_per_s"] / plain["tokens_per_s"]}
        logger.info("%s: plain %.0f tok/s, ray train %.0f tok/s, ratio %.2f", kind, plain["tokens_per_s"], ray["tokens_per_s"], results[kind]["ratio"])
    if not args.skip_job:
        results["job_submit"] = job_submit_to_first_step()
        logger.info("ray job submit: first step after %.1fs, done after %.1fs", results["job_submit"]["first_step_s"] or -1, results["job_submit"]["total_s"])
    OUT.mkdir(exist_ok=True)
    (OUT / "training.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    main()
