"""Throughput of slimlm on Ray Serve: 1 replica vs 2 replicas on one machine (issue 17), through Ray's HTTP proxy.

    .venv/bin/python bench/bench_serve_ray.py                                  # SmolLM2-135M: 1x1, 2x1, 1x2
    .venv/bin/python bench/bench_serve_ray.py --model tiny --requests 16 --prompt-tokens 8 --max-tokens 32
                                                   # a quick check on a random tiny model (128-token context)

Each layout REPLICASxCPUS runs REPLICAS replicas (autoscaling pinned: min = max = REPLICAS) of `CPUS` Ray CPUs and as
many torch threads each, on one local Ray instance (loopback, --ray-cpus CPUs, no dashboard); `1x2` is one replica
using both cores, the scale-up alternative to `2x1`'s scale-out. The load is slimlm's own `slimlm bench serve`
(slimlm/serve/bench.py: streaming chat, vLLM's metrics), run from this process: it shares the CPUs with the replicas
and Ray's proxy, as a client on the same machine would. Every layout gets the same requests (seeded synthetic
prompts, greedy, max_tokens forced with ignore_eos) after --warmup unmeasured ones. The model is served as
`slimlm serve` serves it by default on a CPU (--quantize auto: int8 weight-only, fp32 activations).

Writes --out (JSON: per layout the bench summary without the per-request records) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimlm.engine.core import EngineConfig  # noqa: E402
from slimlm.serve.bench import BenchConfig, run_bench  # noqa: E402
from slimlm.serve.ray_serve import RayServeConfig, replica_counts, run, start_ray  # noqa: E402
from slimlm.serve.state import ServeConfig  # noqa: E402


def tiny_model(folder: Path) -> str:
    """A random 2-layer Llama with a byte-level tokenizer (the tests' tiny model), for a quick run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_hf_tokenizer, make_hf_model, save_hf_model

    tok_dir = folder / "tok"
    build_hf_tokenizer().save_pretrained(str(tok_dir))
    return str(save_hf_model(make_hf_model("llama", seed=1), folder / "tiny", tok_dir))


def layout(text: str) -> tuple[int, float]:
    replicas, _, cpus = text.partition("x")
    return int(replicas), float(cpus or 1)


def bench_layout(model: str, replicas: int, cpus: float, args: argparse.Namespace, port: int) -> dict:
    """Deploy `replicas` x `cpus`, wait for them, run the load, remove the app; the bench summary."""
    engine = EngineConfig(max_batch=args.max_batch, max_seq_len=args.max_seq_len)
    serve_cfg = ServeConfig(model=model, quantize="auto", engine=engine, max_tokens_limit=args.max_tokens)
    name = f"bench{replicas}x{cpus:g}".replace(".", "_")
    ray_cfg = RayServeConfig(
        name=name,
        route_prefix=f"/{name}",
        min_replicas=replicas,
        max_replicas=replicas,
        num_cpus=cpus,
        port=port,
        max_ongoing_requests=args.max_batch,
    )
    t0 = time.monotonic()
    url = run(serve_cfg, ray_cfg)
    while replica_counts(name).get("RUNNING", 0) < replicas:
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"{name}: {replicas} replicas not running after 600 s: {replica_counts(name)}")
        time.sleep(0.5)
    started_s = time.monotonic() - t0
    cfg = BenchConfig(
        url=url,
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        ignore_eos=True,
        warmup=args.warmup,
        seed=0,
    )
    summary = run_bench(cfg)
    from ray import serve

    serve.delete(name)
    summary.pop("requests")
    return {
        "layout": f"{replicas}x{cpus:g}",
        "replicas": replicas,
        "cpus_per_replica": cpus,
        "deploy_s": round(started_s, 1),
        **summary,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="alias / folder, or `tiny` for a random tiny model")
    p.add_argument("--layouts", default="1x1,2x1,1x2", help="REPLICASxCPUS, comma-separated")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8, help="each replica's decode slots (= its Ray concurrency)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--out", default="bench/results/serve_ray.json")
    args = p.parse_args()

    from ray import serve

    with tempfile.TemporaryDirectory(prefix="rb", dir="/tmp") as tmp:  # short: Ray's socket paths
        model = tiny_model(Path(tmp)) if args.model == "tiny" else args.model
        start_ray(None, num_cpus=args.ray_cpus, temp_dir=os.path.join(tmp, "ray"))
        serve.start(http_options={"host": "127.0.0.1", "port": 8765})
        rows = []
        try:
            for replicas, cpus in map(layout, args.layouts.split(",")):
                rows.append(bench_layout(model, replicas, cpus, args, 8765))
                r = rows[-1]
                if not r["completed"]:
                    raise RuntimeError(f"{r['layout']}: every request failed: {r['errors']}")
                print(
                    f"{r['layout']:>5}  {r['request_throughput']:6.2f} req/s  {r['output_throughput']:7.1f} "
                    f"tok/s  TTFT p50 {r['ttft_ms']['median']:7.0f} ms  TPOT p50 {r['tpot_ms']['median']:6.1f} ms  "
                    f"failed {r['failed']}  (deploy {r['deploy_s']} s)",
                    flush=True,
                )
        finally:
            serve.shutdown()
            import ray

            ray.shutdown()
    result = {"model": args.model, "ray_cpus": args.ray_cpus, "command": " ".join(sys.argv), "layouts": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1))
    os.replace(tmp_out, args.out)  # atomic: a reader sees the old results or the new, never half
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
