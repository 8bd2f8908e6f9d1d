"""Serving benchmark: ray-maas's graph vs a plain vLLM OpenAI server and Ray Serve LLM, same model and engine arguments.

The servers are driven, one after the other on the same machine, by vLLM's own
`vllm bench serve` (random dataset, fixed input/output lengths, --ignore-eos, a
fresh --seed per run) at each concurrency, and the figures and ratios ours/raw and ours/Ray Serve LLM
are printed and saved under bench/out/, with the front end's cost: CPU-seconds per 1,000
output tokens of every process of the server but vLLM's engine core (from /proc).

    python -m bench.serving [--input-len 128 --output-len 64 --concurrency 1 16 32 --targets raw ours servellm]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from common.config import load_config, read_yaml
from common.model_store import ensure_default_model, open_store
from common.runtime import LOCAL_ENV, REPO_ROOT, free_port
from deployments.core.adapters import adapters_wanted
from deployments.core.generator import engine_env_vars

logger = logging.getLogger("bench.serving")
OUT = REPO_ROOT / "bench" / "out"
TARGETS = {"raw": "raw vLLM", "ours": "ray-maas", "servellm": "Ray Serve LLM", "servellm-direct": "Ray Serve LLM, direct streaming + HAProxy"}
METRICS = [
    ("output_throughput", "output tok/s"),
    ("median_ttft_ms", "TTFT p50 ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("median_itl_ms", "ITL p50 ms"),
    ("median_tpot_ms", "TPOT p50 ms"),
    ("front_cpu_s_per_1k_tokens", "front-end CPU-s / 1k tokens"),
    ("engine_cpu_s_per_1k_tokens", "engine CPU-s / 1k tokens"),
]


def _wait(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError(url)


ENGINE_TITLE = "VLLM::EngineCore"  # vLLM's engine-core process names itself so (setproctitle); its children are the engine's too


def _process_tree(root: int) -> tuple[dict[int, float], dict[int, str], set[int]]:
    """CPU-seconds so far and command line of every process, and the engine core's processes (it and its workers),
    for `root` and every process under it."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    title: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            title[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick

    def below(pids: set[int]) -> set[int]:
        tree, frontier = set(pids), list(pids)
        while frontier:
            pid = frontier.pop()
            for child, ppid in parent.items():
                if ppid == pid and child not in tree:
                    tree.add(child)
                    frontier.append(child)
        return tree

    tree = below({root})
    engine = below({pid for pid in tree if title.get(pid, "").startswith(ENGINE_TITLE)})  # the CPU backend runs the model in a child
    return {pid: cpu[pid] for pid in tree & cpu.keys()}, title, engine


def process_cpu(root: int) -> dict[str, float]:
    """CPU-seconds (user + system) so far of `root` and every process under it, split into the engine core's
    processes and everything else (the front end: the API server, or every stage, Serve's and Ray's own processes)."""
    cpu, _, engine = _process_tree(root)
    split = {"engine": 0.0, "front": 0.0}
    for pid, seconds in cpu.items():
        split["engine" if pid in engine else "front"] += seconds
    return split


def process_kind(title: str) -> str:
    """A short name for what a process is, from its command line (Ray's workers are titled `ray::<actor>`)."""
    if title.startswith("ray::ServeReplica:"):
        return title.split()[0].rsplit(":", 1)[-1]  # the deployment: Ingress, Tokenizer, Postprocessor, Generator, ...
    if title.startswith("ray::"):
        return title.split()[0][5:].split(".")[0]  # ServeController, ProxyActor, BillingActor, IDLE, ...
    for name in ("gcs_server", "raylet", "haproxy", "log_monitor", "monitor.py", "dashboard_agent", "dashboard.py", "runtime_env/agent", "vllm", "uvicorn"):
        if name in title:
            return name.replace(".py", "").replace("runtime_env/agent", "runtime_env_agent")
    return title.split()[0].rsplit("/", 1)[-1][:24] if title else "?"


def process_cpu_by_kind(root: int) -> dict[str, float]:
    """`process_cpu`, split by process kind (`process_kind`; the engine core and its workers as `engine`)."""
    cpu, title, engine = _process_tree(root)
    split: dict[str, float] = {}
    for pid, seconds in cpu.items():
        kind = "engine" if pid in engine else process_kind(title.get(pid, ""))
        split[kind] = split.get(kind, 0.0) + seconds
    return split


@contextmanager
def server(cmd: list[str], env: dict[str, str], ready_url: str, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT)
        try:
            _wait(ready_url, proc)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)  # maas serve stops its own Ray cluster on SIGTERM
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


DEFAULT_CONFIG = REPO_ROOT / "cluster/configs/default.yaml"


def config_with(name: str, overrides: dict) -> Path:
    """The shipped default config with `overrides` deep-merged, written under bench/out for a server to read."""
    path = OUT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(read_yaml(DEFAULT_CONFIG, overrides)))
    return path


_CORES = sorted(os.sched_getaffinity(0))
ENGINE_CORE = str(_CORES[-1])  # --isolate: the engine's threads here ...
FRONT_CORES = ",".join(str(c) for c in _CORES[:-1]) or ENGINE_CORE  # ... every other process here


def bench_config(args: argparse.Namespace) -> Path:
    """The config every server runs: the shipped default, with `--cpu-preload` and `--isolate` applied when given."""
    overrides: dict = {}
    if args.cpu_preload:
        overrides["cpu_preload"] = args.cpu_preload
    if getattr(args, "isolate", False):
        overrides["cpu_threads_bind"] = ENGINE_CORE
    if not overrides:
        return DEFAULT_CONFIG
    return config_with("serving-" + "-".join(f"{k}-{v}" for k, v in sorted(overrides.items())), {"engine": overrides})


def raw_vllm(model_path: Path, model_name: str, port: int, config_path: Path | None = None) -> tuple[list[str], dict[str, str], str]:
    config = load_config(config_path)
    eng = config.engine
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path), "--served-model-name", model_name,
        "--dtype", eng.dtype, "--max-model-len", str(eng.max_model_len), "--max-num-seqs", str(eng.max_num_seqs),
        "--seed", str(eng.seed), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if not eng.log_stats:  # engine statistics on or off on both sides alike
        cmd.append("--disable-log-stats")
    if eng.enforce_eager:
        cmd.append("--enforce-eager")
    if adapters_wanted(eng.enable_lora, str(config.store_root()), config.model.name):  # the same engine as ours (bench.lora measures LoRA's cost)
        cmd += ["--enable-lora", "--max-loras", str(eng.max_loras), "--max-cpu-loras", str(max(eng.max_cpu_loras, eng.max_loras)), "--max-lora-rank", str(eng.max_lora_rank)]
    env = {**os.environ, **LOCAL_ENV, **engine_env_vars(eng, len(os.sched_getaffinity(0)))}
    return cmd, env, f"http://127.0.0.1:{port}/v1/models"


def ours(port: int, config_path: Path | None = None) -> tuple[list[str], dict[str, str], str]:
    cmd = [sys.executable, "-m", "cluster.cli", *(["--config", str(config_path)] if config_path else []), "serve", "--port", str(port)]
    ledger = OUT / "bench-ledger.db"  # billing on, as users run it, without touching the user's own ledger
    return cmd, {**os.environ, **LOCAL_ENV, "MAAS_LEDGER_URL": f"sqlite:///{ledger}"}, f"http://127.0.0.1:{port}/healthz"


def serve_llm(port: int, direct: bool = False) -> tuple[list[str], dict[str, str], str]:
    """Ray Serve LLM on the same engine; `direct`: its best 2.60 configuration (direct streaming behind HAProxy)."""
    return [sys.executable, "-m", "bench.serve_llm", "--port", str(port), *(["--direct"] if direct else [])], {**os.environ, **LOCAL_ENV}, f"http://127.0.0.1:{port}/v1/models"


def bench_key(env: dict[str, str], tenant: str = "bench", plan: str = "enterprise", config: Path = DEFAULT_CONFIG) -> str:
    """A key of `tenant` (unlimited by default), made with the CLI against the running server's cluster, as an operator would."""
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "--config", str(config), "keys", "create", "--tenant", tenant, "--plan", plan],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return out.stdout.split("shown only now:", 1)[1].split()[0]  # the key itself, not its id earlier in the line


def run_vllm_bench(base_url: str, model_name: str, tokenizer: Path, concurrency: int, num_prompts: int, args: argparse.Namespace) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", model_name, "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
            "--seed", str(random.randrange(1 << 30)), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--num-warmups", str(min(concurrency, 4)), "--disable-tqdm",
        ]
    )  # fmt: skip
    return bench_main(bench_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompts-per-concurrency", type=int, default=4, help="num prompts = max(8, this x concurrency)")
    parser.add_argument("--targets", nargs="+", default=["raw", "ours", "servellm", "servellm-direct"], choices=list(TARGETS))
    parser.add_argument("--rounds", type=int, default=2, help="alternate the targets this many times (raw, ours, raw, ours, ...)")
    parser.add_argument("--cpu-preload", choices=["auto", "off"], default=None, help="engine.cpu_preload for raw vLLM and ray-maas alike (default: the config's)")
    parser.add_argument(
        "--isolate", action="store_true",
        help="engine-isolated: the engine's threads bound to the last core and every other process of the server to the "
        "others (taskset), the same for every server, as on a GPU node where the front end cannot take the engine's cycles",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.update(LOCAL_ENV)

    config = load_config()
    model = ensure_default_model(open_store(config.store_root()), config.model.name)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[int, list[dict]]] = {t: {c: [] for c in args.concurrency} for t in args.targets}
    cfg = bench_config(args)
    for round_no in range(args.rounds):
        for target in args.targets:
            port = free_port()
            cmd, env, ready = raw_vllm(model.path, config.model.name, port, cfg) if target == "raw" else ours(port, cfg) if target == "ours" else serve_llm(port, direct=target == "servellm-direct")
            env = {**env, "MAAS_CONFIG": str(cfg)}  # Ray Serve LLM reads the same engine settings
            if args.isolate:
                cmd = ["taskset", "-c", FRONT_CORES, *cmd]
            logger.info("round %d: starting %s: %s", round_no + 1, target, " ".join(cmd))
            t0 = time.monotonic()
            with server(cmd, env, ready, OUT / f"{stamp}-{target}-{round_no + 1}.log") as proc:
                logger.info("%s ready in %.0fs", target, time.monotonic() - t0)
                os.environ["OPENAI_API_KEY"] = bench_key(env) if target == "ours" else "none"  # vllm bench sends it as Bearer
                for c in args.concurrency:
                    before = process_cpu(proc.pid)
                    result = run_vllm_bench(f"http://127.0.0.1:{port}", config.model.name, model.path, c, max(8, args.prompts_per_concurrency * c), args)
                    after = process_cpu(proc.pid)
                    # Warm-up requests are not in total_output_tokens; their few tokens count against the front end.
                    tokens = result.get("total_output_tokens") or 0
                    if tokens:
                        result["front_cpu_s_per_1k_tokens"] = (after["front"] - before["front"]) / tokens * 1000
                        result["engine_cpu_s_per_1k_tokens"] = (after["engine"] - before["engine"]) / tokens * 1000
                    results[target][c].append(result)
    report = format_report(results, args)
    print(report)
    (OUT / f"{stamp}-serving.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    (OUT / f"{stamp}-serving.md").write_text(report)


def _mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _cell(runs: list[dict], key: str, digits: int = 1) -> str:
    mean = _mean(runs, key)
    if mean is None:
        return "-"
    values = [r[key] for r in runs if r.get(key) is not None]
    spread = f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{spread}"


def _ratio(ours: float | None, other: float | None, key: str) -> str:
    if not ours or not other:
        return "-"
    delta = f" ({ours - other:+.0f} ms)" if key.endswith("_ms") else ""
    return f"{ours / other:.2f}{delta}"


def format_report(results: dict[str, dict[int, list[dict]]], args: argparse.Namespace) -> str:
    targets = [t for t in TARGETS if t in results]
    others = [t for t in ("raw", "servellm", "servellm-direct") if t in results and "ours" in results]
    lines = [
        f"input {args.input_len} tokens, output {args.output_len} tokens (--ignore-eos), random dataset, vllm bench serve;",
        f"mean of {args.rounds} alternating rounds (min-max in brackets); engine.cpu_preload: {args.cpu_preload or 'as configured'}; "
        + (f"engine-isolated (engine threads on core {ENGINE_CORE}, everything else on {FRONT_CORES})" if getattr(args, "isolate", False) else "shared cores"),
        "",
        "| concurrency | metric | " + " | ".join(TARGETS[t] for t in targets) + "".join(f" | ours/{t}" for t in others) + " |",
        "| --- | --- |" + " --- |" * (len(targets) + len(others)),
    ]
    for c in args.concurrency:
        runs = {t: results[t].get(c, []) for t in targets}
        for key, label in METRICS:
            digits = 2 if "cpu" in key else 1
            cells = [_cell(runs[t], key, digits) for t in targets] + [_ratio(_mean(runs["ours"], key), _mean(runs[t], key), key) for t in others]
            lines.append(f"| {c} | {label} | " + " | ".join(cells) + " |")
        failed = {t: sum(r.get("failed", 0) or 0 for r in runs[t]) for t in targets}
        if any(failed.values()):
            lines.append(f"| {c} | failed requests | " + " | ".join(str(failed[t]) for t in targets) + " |" + " |" * len(others))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
