"""LoRA benchmark: what tenants' fine-tunes cost to train and to serve.

1. Training: a LoRA job and a full fine-tune of the real default model on the same data, steps,
   workers and cores (`training.finetune.run` on a local Ray cluster): job wall time and training
   tokens per second (steady state, non-padding tokens).
2. Serving: decode tokens/s of one vLLM engine (the generator's own engine arguments) at c=1 and
   c=16, for the base model on an engine without LoRA support, the base on an engine with it, and
   requests spread over 1 and over 4 adapters (rank 8 on the attention projections, as the API's
   default; the adapters' weights are random: the cost does not depend on them).

    python -m bench.lora [--steps 10] [--tokens 64] [--skip-training] [--skip-serving]

Writes bench/out/lora.json. One engine or one Ray cluster at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from common.runtime import REPO_ROOT

logger = logging.getLogger("bench.lora")
OUT = REPO_ROOT / "bench" / "out"
PROMPT = [{"role": "user", "content": "Tell me a long story about a ship and its crew."}]


def train(method: str, steps: int, root: Path) -> dict:
    from common.config import load_config
    from common.model_store import ensure_default_model, open_store
    from training.config import load_train_config
    from training.finetune import run

    config = load_config()
    default = ensure_default_model(open_store(config.store_root()), config.model.name)
    store = root / f"store-{method}"
    open_store(store).link_version(default)
    cfg = load_train_config(
        REPO_ROOT / "training/configs/pirate.yaml",
        {
            "method": {"type": method},
            "optim": {"max_steps": steps, "warmup_steps": 1, "learning_rate": 1e-3 if method == "lora" else 5e-5},
            "checkpoint": {"every_steps": 10_000, "storage_path": str(root / f"runs-{method}")},
            "output": {"publish": True, "name": f"bench-{method}"},
            "model_store": str(store),
        },
    )
    t0 = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t0
    m = result.metrics
    return {"method": method, "steps": m["step"], "wall_s": round(wall, 1), "tokens_per_s": round(m["tokens_per_s_mean"], 1), "trained_tokens": m["trained_tokens"],
            "eval_loss_before": round(m["eval_loss_before"], 3), "eval_loss_after": round(m["eval_loss"], 3),
            "published_mb": round(sum(f.stat().st_size for f in (store / f"bench-{method}" / "v1").iterdir()) / 2**20, 2)}  # fmt: skip


def make_adapters(base: str, n: int, root: Path) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights="gaussian"))
        path = root / f"adapter-{i}"
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


async def decode(engine, ids: list[int], concurrency: int, tokens: int, loras: list) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, detokenize=False)
    counter = iter(range(10**9))

    async def one() -> int:
        i = next(counter)
        lora = loras[i % len(loras)] if loras else None
        out = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"b{i}", lora_request=lora):
            pass
        return len(out.outputs[0].token_ids)

    await asyncio.gather(*(one() for _ in range(concurrency)))  # warm-up (and loads the adapters)
    t0 = time.perf_counter()
    produced = sum(await asyncio.gather(*(one() for _ in range(concurrency * (3 if concurrency == 1 else 1)))))
    return produced / (time.perf_counter() - t0)


def serve(tokens: int, root: Path) -> list[dict]:
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from common.config import load_config
    from common.model_store import open_store
    from deployments.core.generator import engine_args, engine_env_vars

    config = load_config()
    os.environ.update(engine_env_vars(config.engine))  # as the generator's replica sets them: threads bound, KV cache size, tcmalloc
    base = str(open_store(config.store_root()).resolve(config.model.name).path)
    ids = AutoTokenizer.from_pretrained(base).apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    adapters = make_adapters(base, 4, root)
    rows: list[dict] = []

    async def one_engine(enable: bool) -> None:  # the engine lives in one event loop
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(base, config.engine.model_copy(update={"enable_lora": enable}))))
        cases = [("base", [])] if not enable else [("base", []), ("1 adapter", [LoRARequest("a0", 1, adapters[0])]), ("4 adapters", [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(adapters)])]
        try:
            for name, loras in cases:
                for c in (1, 16):
                    rate = await decode(engine, ids, c, tokens, loras)
                    rows.append({"engine": "enable_lora" if enable else "no LoRA", "requests": name, "concurrency": c, "decode_tok_s": round(rate, 1)})
                    logger.info("%s", rows[-1])
        finally:
            engine.shutdown()

    for enable in (False, True):
        asyncio.run(one_engine(enable))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="maas-bench-lora-") as tmp:
        if not args.skip_serving:
            out["serving"] = serve(args.tokens, Path(tmp))
        if not args.skip_training:
            import ray

            from common.runtime import use_local_env

            use_local_env()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
            try:
                out["training"] = [train(m, args.steps, Path(tmp)) for m in ("lora", "full")]
            finally:
                ray.shutdown()
    (OUT / "lora.json").write_text(json.dumps(out, indent=2))
    for section, rows in out.items():
        logger.info("%s:", section)
        for row in rows:
            logger.info("  %s", row)


if __name__ == "__main__":
    main()
