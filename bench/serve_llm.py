"""Ray Serve LLM serving the same model with the same engine arguments, for the serving benchmark's third column.

`ray.serve.llm.build_openai_app` on a local Ray cluster of its own, with CPU placement (one
`{"CPU": 1}` bundle, `accelerator_config={"kind": "cpu"}`) and an ingress that asks for no CPU, as
the issue that asked for the comparison configured it. Runs until SIGTERM:

    python -m bench.serve_llm --port 8010
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from common.config import load_config
from common.model_store import open_store
from common.runtime import LOCAL_ENV
from deployments.core.generator import engine_env_vars

logger = logging.getLogger("bench.serve_llm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--direct", action="store_true",
        help="Ray Serve LLM's best configuration in 2.60: direct streaming (the LLM server is the ingress, its replicas "
        "answer HTTP themselves) behind Serve's HAProxy, as RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING documents",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.update(LOCAL_ENV)
    if args.direct:  # read when Ray and Serve are imported, and by every process of the cluster started here
        threads = str(max(1, min(4, len(os.sched_getaffinity(0)))))
        os.environ.update(RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING="1", RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_HAPROXY_NBTHREAD=threads)

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    config = load_config()
    eng = config.engine
    model = open_store(config.store_root()).resolve(config.model.name)
    env = engine_env_vars(eng, len(os.sched_getaffinity(0)))
    ray.init(include_dashboard=False, runtime_env={"env_vars": {**LOCAL_ENV, **env, **{k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}}})
    llm = LLMConfig(
        model_loading_config={"model_id": config.model.name, "model_source": str(model.path)},
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        engine_kwargs={
            "dtype": eng.dtype, "max_model_len": eng.max_model_len, "max_num_seqs": eng.max_num_seqs,
            "enforce_eager": eng.enforce_eager, "seed": eng.seed, "disable_log_stats": not eng.log_stats,
        },  # fmt: skip
        runtime_env={"env_vars": env},
    )
    # Direct streaming makes the LLM server the ingress (no separate ingress deployment to configure).
    app = build_openai_app({"llm_configs": [llm]} if args.direct else {"llm_configs": [llm], "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(app, name="serve-llm", route_prefix="/")
    logger.info("Ray Serve LLM serving %s on 127.0.0.1:%d", config.model.name, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
