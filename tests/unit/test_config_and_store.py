"""The config root, Serve options derived from it, and the model store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from cluster.serve_config import serve_config_for
from common.config import MaasConfig, load_config
from common.errors import ModelNotFoundError
from common.model_store import METADATA_FILE, LocalModelStore, open_store
from common.runtime import REPO_ROOT
from deployments.app import deployment_options
from deployments.core.generator import cpu_preload_libs, engine_args, engine_env_vars



def _walk(model: type[BaseModel]):
    for name, field in model.model_fields.items():
        yield model.__name__, name, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann)


def test_every_config_field_is_described():
    missing = [f"{m}.{n}" for m, n, f in _walk(MaasConfig) if not f.description]
    assert not missing, missing


@pytest.mark.parametrize("name", ["default.yaml", "gpu.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO_ROOT / "cluster" / "configs" / name)
    assert config.model.name == "SmolLM2-135M-Instruct"
    # Billing is on, the served model has a price, and the default plan exists.
    assert config.billing.enabled and config.billing.price_book.price_for(config.model.name).completion_per_1m > 0
    assert config.billing.default_plan in config.billing.plans


def test_unknown_fields_are_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: {dtyp: float16}\n")
    with pytest.raises(ValidationError):
        load_config(path)


def test_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("MAAS_PORT", "9123")
    monkeypatch.setenv("MAAS_MODEL_STORE", str(tmp_path))
    config = load_config()
    assert config.http.port == 9123 and config.store_root() == tmp_path


def test_generator_gets_a_gpu_only_on_gpu_configs():
    cpu = load_config(REPO_ROOT / "cluster/configs/default.yaml")
    gpu = load_config(REPO_ROOT / "cluster/configs/gpu.yaml")
    assert deployment_options(cpu.deployments.generator)["ray_actor_options"]["num_gpus"] == 0
    assert deployment_options(gpu.deployments.generator, gpus=1.0)["ray_actor_options"]["num_gpus"] == 1.0
    opts = deployment_options(cpu.deployments.tokenizer)
    assert opts["ray_actor_options"]["num_cpus"] < 1 and opts["max_ongoing_requests"] > 5
    assert opts["autoscaling_config"]["min_replicas"] >= 1


def test_default_graph_fits_two_cpus():
    stages = load_config(REPO_ROOT / "cluster/configs/default.yaml").deployments
    total = sum(s.num_cpus * s.autoscaling.min_replicas for s in (stages.ingress, stages.tokenizer, stages.generator, stages.postprocessor))
    assert total <= 1.0  # leaves room for Serve's controller and proxy on 2 cores


def test_engine_env_and_args_on_cpu():
    config = load_config(REPO_ROOT / "cluster/configs/default.yaml").engine
    env = engine_env_vars(config, num_cpus_on_node=2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["OMP_NUM_THREADS"] == "2" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    args = engine_args("/m", config)
    assert not args["skip_tokenizer_init"] and args["max_logprobs"] == 20 and args["dtype"] == "float32" and "gpu_memory_utilization" not in args
    assert engine_args("/m", config.model_copy(update={"structured_outputs": False}))["skip_tokenizer_init"]  # no grammars: token ids only


def test_cpu_preload_finds_tcmalloc_and_intel_openmp_where_they_are(tmp_path):
    system, env = tmp_path / "usr-lib", tmp_path / "venv"
    system.mkdir()
    (env / "lib").mkdir(parents=True)
    assert cpu_preload_libs((str(system),), str(env), "x86_64") == []  # nothing installed: nothing preloaded
    for name in ("libtcmalloc_minimal_debug.so.4", "libtcmalloc_minimal.so.4"):
        (system / name).write_bytes(b"")
    (env / "lib" / "libiomp5.so").write_bytes(b"")
    assert cpu_preload_libs((str(system),), str(env), "x86_64") == [str(system / "libtcmalloc_minimal.so.4"), str(env / "lib" / "libiomp5.so")]
    assert cpu_preload_libs((str(system),), str(env), "aarch64") == [str(system / "libtcmalloc_minimal.so.4")]  # Intel OpenMP is x86 only
    config = load_config(REPO_ROOT / "cluster/configs/default.yaml").engine.model_copy(update={"cpu_preload": "off"})
    assert "LD_PRELOAD" not in engine_env_vars(config, num_cpus_on_node=2)


def test_shipped_serve_config_matches_generated():
    shipped = yaml.safe_load((REPO_ROOT / "cluster" / "serve_config.yaml").read_text())
    assert shipped == serve_config_for(load_config(REPO_ROOT / "cluster/configs/default.yaml"), versions=["v1"])


def _hf_folder(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    (path / "config.json").write_text("{}")
    return path


def test_store_publishes_versions_and_resolves_latest(tmp_path):
    store = open_store(tmp_path / "store")
    assert store.models() == []
    v1 = store.publish("m", _hf_folder(tmp_path / "a"), {"source": {"kind": "test"}})
    v2 = store.publish("m", _hf_folder(tmp_path / "b", b"other"), {"source": {"kind": "test"}})
    assert (v1.version, v2.version) == ("v1", "v2")
    assert store.resolve("m").version == "v2" and store.resolve("m", "v1").path == v1.path
    meta = json.loads((v1.path / METADATA_FILE).read_text())
    assert meta["sha256"]["model.safetensors"] and meta["created_at"] and meta["source"] == {"kind": "test"}
    assert store.models() == ["m"]
    with pytest.raises(ModelNotFoundError):
        store.resolve("m", "v9")
    with pytest.raises(ModelNotFoundError):
        store.resolve("other")


def test_failed_publish_leaves_nothing(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError):
        store.publish("m", tmp_path / "missing", {})
    assert store.versions("m") == []
    assert not [p for p in (tmp_path / "store" / "m").iterdir() if p.name.startswith(".staging")]


def test_store_rejects_unsupported_uris():
    with pytest.raises(ValueError):
        open_store("s3://bucket/models")
    assert open_store("file:///tmp/x").root == Path("/tmp/x")


def test_cli_progress_reads_training_steps_and_reports_plainly_off_a_terminal(capsys):
    from cluster.cli.common import progress
    from cluster.cli.models import training_step

    assert training_step("INFO training.loop step 12/50  loss 2.3456  tokens/s 812  lr 1.00e-04") == (12, 50, 2.3456)
    assert training_step("dataset encoded: 40 train / 8 eval examples") is None
    with progress("Deploying") as note:  # not a terminal here: one plain line per change of news
        note.update("Generator updating (starting 1)")
        note.update("Generator updating (starting 1)")
        note.update("every deployment healthy")
    err = capsys.readouterr().err
    assert err.count("Generator updating") == 1 and "every deployment healthy" in err and "done in" in err


def test_a_local_cluster_runs_job_entrypoints_with_this_interpreters_python(monkeypatch):
    """`maas up` then `ray job submit -- python -m training.finetune` from a shell where the venv is not active:
    the cluster's PATH (what a job's entrypoint sees) starts with the folder of the interpreter running the cluster."""
    import os
    import shutil
    import sys

    from common.runtime import use_local_env, with_interpreter_first

    here = os.path.dirname(sys.executable)
    assert with_interpreter_first(f"/usr/bin{os.pathsep}{here}{os.pathsep}/bin") == os.pathsep.join([here, "/usr/bin", "/bin"])
    assert with_interpreter_first(os.pathsep.join([here, "/usr/bin"])) == os.pathsep.join([here, "/usr/bin"])
    assert with_interpreter_first("") == here
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_local_env()
    assert os.environ["PATH"].split(os.pathsep)[0] == here and shutil.which("python") == os.path.join(here, "python")


def test_down_forgets_its_cluster_in_rays_current_cluster_file_and_only_its_own(tmp_path):
    from cluster.up import forget_current_cluster

    f = tmp_path / "ray_current_cluster"
    f.write_text("127.0.0.1:6379")
    assert not forget_current_cluster("127.0.0.1:50421", f) and f.exists()  # another cluster's: kept
    assert forget_current_cluster("127.0.0.1:6379", f) and not f.exists()
    assert not forget_current_cluster("127.0.0.1:6379", f)  # nothing there: nothing to do


def test_a_served_models_view_is_the_single_model_config_the_fleet_reads_and_old_configs_still_load():
    old = MaasConfig.model_validate({"model": {"name": "only-one"}})  # a config from before `models:`
    assert old.served() == [old] and old.for_model("only-one") is old
    cfg = MaasConfig.model_validate(
        {
            "engine": {"max_model_len": 2048, "dtype": "float32"},
            "deployments": {"generator": {"num_cpus": 0.5}},
            "models": [
                {"name": "emb", "task": "embed", "engine": {"max_model_len": 256}, "deployment": {"num_cpus": 0.1, "autoscaling": {"min_replicas": 0}}},
                {"name": "chat-2", "task": "chat"},
            ],
        }
    )
    emb, chat2 = cfg.for_model("emb"), cfg.for_model("chat-2")
    assert (emb.model.name, emb.model.task, emb.engine.max_model_len, emb.engine.dtype) == ("emb", "embed", 256, "float32")
    assert emb.deployments.generator.autoscaling.min_replicas == 0 and emb.models == []
    assert chat2.deployments.generator.num_cpus == 0.5  # no deployment of its own: the top-level generator's
    assert chat2.fine_tuning == cfg.fine_tuning  # tenants fine-tune any chat model, with the cluster's one queue
    assert [v.model.name for v in cfg.served()] == [cfg.model.name, "emb", "chat-2"]
    with pytest.raises(ValueError, match="unique"):
        MaasConfig.model_validate({"models": [{"name": cfg.model.name}]})
    with pytest.raises(ValueError, match="main chat model|models:"):
        MaasConfig.model_validate({"model": {"task": "embed"}})
    with pytest.raises(KeyError):
        cfg.for_model("nope")
