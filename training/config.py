"""The fine-tuning job's configuration: one pydantic root loaded from YAML, every field described.

`training/configs/*.yaml` hold the shipped jobs; `python -m training.finetune --config FILE`
and `maas train FILE` run them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from common.config import Strict, read_yaml
from common.runtime import repo_path


class BaseModelRef(Strict):
    name: str = Field("SmolLM2-135M-Instruct", description="Model in the store to start from (its tokenizer and chat template are always used).")
    version: str = Field("latest", description="Store version to start from, or `latest`.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="`pretrained` fine-tunes the version's weights; `random` builds a fresh model from `random_config` (tests, benchmarks)."
    )
    random_config: dict[str, Any] = Field(
        default_factory=lambda: {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        description="With init=random: fields that override the base version's HF config (e.g. fewer, smaller layers).",
    )


class DataConfig(Strict):
    path: str = Field("training/datasets/pirate_sft.jsonl", description="JSONL chat dataset, one `{\"messages\": [{role, content}, ...]}` per line (relative paths: repo root).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of examples held out for the eval loss (a deterministic split by `seed`); unused with `eval_path`.")
    eval_path: str | None = Field(None, description="A separate JSONL of held-out examples (a fine-tuning job's validation file); all of `path` is then trained on.")
    max_seq_len: int = Field(256, ge=8, description="Examples are truncated to this many tokens.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="The dataset's expected SHA-256 (a fine-tuning job pins it): the run refuses a file that differs, before training.")


class LoraConfig(Strict):
    rank: int = Field(8, ge=1, le=256, description="Rank of the low-rank update (vLLM serves adapters up to `engine.max_lora_rank`).")
    alpha: float = Field(16.0, gt=0, description="Scale of the update (alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, description="Linear layers that get an adapter (attention projections by default)."
    )


class MethodConfig(Strict):
    type: Literal["full", "lora"] = Field("full", description="`full` trains every weight and publishes a new version; `lora` trains an adapter (peft) served on the base.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter, with type=lora.")


class OptimConfig(Strict):
    max_steps: int = Field(60, ge=1, description="Optimizer steps in the run (with `epochs`, an upper bound).")
    epochs: int | None = Field(None, ge=1, le=100, description="Passes over the training examples; sets the steps from the data (at most `max_steps`).")
    batch_size_per_worker: int = Field(4, ge=1, description="Examples per worker per step (the global batch is this × workers).")
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate (linear warm-up, then linear decay to 10%).")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed for the split, the random init and the data order.")


class ScalingConfig(Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker and the `nccl` backend; otherwise CPUs and `gloo`.")
    cpus_per_worker: float = Field(0.8, gt=0, description="CPUs reserved per worker (fractions allowed; leave some for Ray Data).")
    fit: bool = Field(
        True, description="Shrink the worker group to the CPUs free when the job starts (fewer workers, then smaller ones down to `min_cpus_per_worker`), as beside a serving graph; wait, saying so, while not even that fits."
    )
    min_cpus_per_worker: float = Field(0.4, gt=0, description="With `fit`: the smallest worker the job starts with.")
    wait_s: float = Field(900.0, ge=0, description="With `fit`: how long to wait for CPUs before failing with a clear error.")
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads per worker (default: the whole CPUs it reserves, at least 1).")


class CheckpointConfig(Strict):
    storage_path: str = Field("~/.cache/ray-maas/train", description="Where Ray Train writes run folders and checkpoints: local, or a shared path/URI (s3://, gs://, NFS) on clusters. Overridden by MAAS_TRAIN_STORAGE.")
    every_steps: int = Field(20, ge=1, description="Checkpoint every this many steps (and at the end).")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept per run.")
    max_failures: int = Field(2, ge=0, description="Worker failures a run recovers from (restarting from the latest checkpoint).")


class OutputConfig(Strict):
    name: str | None = Field(None, description="Model name the result is published under (default: the base model's, i.e. a new version of it).")
    publish: bool = Field(True, description="Publish the final checkpoint as a new version in the model store.")
    report_dir: str | None = Field(
        None, description="A folder every node can write where the job appends `events.jsonl` (steps, losses, tokens) and `checkpoints.jsonl`, and writes `result.json` (the fine-tuning API reads them)."
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Extra lineage kept with the published model (e.g. the tenant and job of a fine-tune).")


class TrainConfig(Strict):
    run_name: str | None = Field(None, description="Ray Train run name (default: `<output name>-<timestamp>`).")
    base: BaseModelRef = Field(default_factory=BaseModelRef, description="What to fine-tune.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Full fine-tune or a LoRA adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="The chat dataset.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Workers and resources (Ray Train ScalingConfig).")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints and failure recovery.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the result goes.")
    model_store: str | None = Field(None, description="Model store root (default: the serving config's store, MAAS_MODEL_STORE).")

    @model_validator(mode="after")
    def _checks(self) -> "TrainConfig":
        if self.optim.warmup_steps >= self.optim.max_steps and self.optim.max_steps > 1:
            raise ValueError("optim.warmup_steps must be smaller than optim.max_steps")
        return self

    @property
    def output_name(self) -> str:
        return self.output.name or self.base.name

    def data_path(self) -> Path:
        return repo_path(self.data.path)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a job config from YAML (repo-relative paths work from any cwd) and deep-merge `overrides`."""
    return TrainConfig.model_validate(read_yaml(path, overrides))
