"""Where the first token's time goes: streamed requests one at a time, every stage's wall-clock marks lined up.

Starts `maas serve` (as `bench.serving` does), sends `--requests` streamed completions of
`--input-len` random token ids one after the other with the official `openai` client, then reads
the `trace` marks each stage wrote on its log line for the request (`<session>/logs/maas/*.jsonl`)
and prints each hop's p50 and p99 in ms, from the client's send to its first chunk. With `--raw`,
the same requests against raw vLLM's server first, for the TTFT to compare with.

    python -m bench.trace [--requests 30 --input-len 128 --raw]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path

from bench.serving import OUT, bench_key, ours, raw_vllm, server
from common.config import load_config
from common.model_store import ensure_default_model, open_store
from common.runtime import LOCAL_ENV, free_port

logger = logging.getLogger("bench.trace")

# (hop, from mark, to mark), in the order the first token's path takes them.
HOPS = [
    ("client → ingress handler (HTTP, proxy, auth, body)", "client_send", "ingress_in"),
    ("admission (request slot)", "ingress_in", "ingress_admitted"),
    ("admitted → tokenized (a short prompt in the ingress itself, a long one through the tokenizer stage)", "ingress_admitted", "ingress_tokenized"),
    ("ingress → tokenizer call", "ingress_admitted", "tokenizer_start"),
    ("tokenizing", "tokenizer_start", "tokenizer_end"),
    ("tokenizer → ingress reply", "tokenizer_end", "ingress_tokenized"),
    ("reserve worst case, build request", "ingress_tokenized", "ingress_sent"),
    ("ingress → generator call (responses written in the ingress, the default)", "ingress_sent", "generator_called"),
    ("ingress → postprocessor call", "ingress_sent", "postprocessor_called"),
    ("postprocessor → generator call", "postprocessor_called", "generator_called"),
    ("engine: queue, prefill, first token", "generator_called", "generator_first_output"),
    ("generator → postprocessor, detokenize, shape", "generator_first_output", "postprocessor_first_piece"),
    ("postprocessor → ingress (first piece)", "postprocessor_first_piece", "ingress_first_piece"),
    ("generator → ingress, detokenize, shape (first piece)", "generator_first_output", "ingress_first_piece"),
    ("ingress → client (first chunk)", "ingress_first_piece", "client_first"),
    ("TTFT seen by the client", "client_send", "client_first"),
]


def drive(base_url: str, api_key: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Streamed completions one at a time; the client's send and first-chunk times, by request id."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
    marks = []
    for prompt in prompts:
        sent = time.time()
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True})
        first, chunk_id = None, None
        for chunk in stream:
            if first is None:
                first, chunk_id = time.time(), chunk.id
        marks.append({"request_id": (chunk_id or "").split("-", 1)[-1], "client_send": sent, "client_first": first})
    return marks


def stage_marks(logs_dir: Path) -> dict[str, dict[str, float]]:
    """Every `trace` mark in the session's JSON logs, merged by request id."""
    found: dict[str, dict[str, float]] = {}
    for path in logs_dir.glob("*.jsonl"):
        for line in path.read_text(errors="replace").splitlines():
            if '"trace"' not in line:
                continue
            record = json.loads(line)
            if record.get("request_id") and isinstance(record.get("trace"), dict):
                found.setdefault(record["request_id"], {}).update(record["trace"])
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def report(rows: list[dict], raw: list[dict] | None) -> str:
    lines = [f"{len(rows)} streamed completions, one at a time; ms (p50 / p99)", "", "| hop | p50 | p99 |", "| --- | --- | --- |"]
    for name, a, b in HOPS:
        # The generator's marks pair with the ingress's only when no postprocessor stage stood between them.
        inline_only = {a, b} & {"generator_called", "generator_first_output"} and {a, b} & {"ingress_sent", "ingress_first_piece"}
        values = [(r[b] - r[a]) * 1000 for r in rows if r.get(a) is not None and r.get(b) is not None and not (inline_only and "postprocessor_called" in r)]
        if values:
            lines.append(f"| {name} | {percentile(values, 50):.1f} | {percentile(values, 99):.1f} |")
    if raw:
        ttft = [(r["client_first"] - r["client_send"]) * 1000 for r in raw]
        lines.append(f"| raw vLLM's TTFT, same prompts | {percentile(ttft, 50):.1f} | {percentile(ttft, 99):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--raw", action="store_true", help="also time raw vLLM's server on the same prompts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.update(LOCAL_ENV)
    config = load_config()
    model = ensure_default_model(open_store(config.store_root()), config.model.name)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(args.input_len)] for _ in range(args.requests + 2)]
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw_marks = None
    if args.raw:
        port = free_port()
        cmd, env, ready = raw_vllm(model.path, config.model.name, port)
        with server(cmd, env, ready, OUT / f"{stamp}-trace-raw.log"):
            raw_marks = drive(f"http://127.0.0.1:{port}", "none", config.model.name, prompts, args.output_len)[2:]
    port = free_port()
    cmd, env, ready = ours(port)
    with server(cmd, env, ready, OUT / f"{stamp}-trace-ours.log"):
        key = bench_key(env)
        client_marks = drive(f"http://127.0.0.1:{port}", key, config.model.name, prompts, args.output_len)[2:]  # two warm-ups
        time.sleep(2.0)  # the stages' log lines are written at each request's end
        stages = stage_marks(Path("/tmp/ray/session_latest/logs/maas"))
    rows = [{**stages.get(m["request_id"], {}), **m} for m in client_marks]
    text = report(rows, raw_marks)
    print(text)
    (OUT / f"{stamp}-trace.md").write_text(text)


if __name__ == "__main__":
    main()
