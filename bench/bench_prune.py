"""Pruning SmolLM2-135M-Instruct: perplexity vs sparsity (magnitude, Wanda, N:M) and structured removal
(MLP channels, KV groups, layers) with parameters and decode speed against the unpruned model.

Perplexity: slimlm.eval.perplexity protocol (seq_len 512, stride 512) on the built-in held-out corpus, capped at
--ppl-tokens scored tokens (the same tokens for every row). Calibration: --calib-samples x --calib-seq-len tokens of
the built-in calibration split. Speed: slimlm.eval.speed.measure_speed (fp32, batch 1, greedy decode), the unpruned
and the pruned model alternated in one process, --rounds pairs; the median ratio of the pairs is reported. Each
structured model is saved with save_hf_folder and reloaded with slimlm.load before it is measured. Reproduce:

    .venv/bin/python bench/bench_prune.py --json bench/results/prune.json --plot bench/results/prune_ppl.png
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import slimlm
from slimlm.checkpoint import save_hf_folder
from slimlm.eval.corpus import builtin_corpus, calibration_ids
from slimlm.eval.perplexity import perplexity_of_ids
from slimlm.eval.speed import SpeedConfig, measure_speed
from slimlm.prune import prune_heads_, prune_layers_, prune_mlp_channels_, prune_nm_, prune_unstructured_

SPARSITIES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def ppl(model, ids: list[int], args) -> float:
    return perplexity_of_ids(model, ids, max_tokens=args.ppl_tokens, progress=False)["ppl"]


def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)


def sweep(llm, base: dict, ids: list[int], calib: torch.Tensor, args, t0: float) -> list[dict]:
    """Unstructured (per-layer scope) and N:M rows: method, sparsity, measured block-linear sparsity, ppl."""
    rows = []
    runs = [("magnitude", s) for s in SPARSITIES] + [("wanda", s) for s in SPARSITIES if s > 0]
    runs += [(f"{p} {m}", None) for p in ("2:4", "4:8") for m in ("magnitude", "wanda")]
    for method, s in runs:
        llm.model.load_state_dict(base)
        if s is None:
            pattern, score = method.split()
            info = prune_nm_(llm.model, pattern, score, calib)
        else:
            info = prune_unstructured_(llm.model, method, s, calib if method == "wanda" else None, "layer")
        rows.append(
            {
                "method": method,
                "target": info["target_sparsity"],
                "linear_sparsity": info["linear_sparsity"],
                "sparsity_all_params": info["sparsity"],
                "ppl": ppl(llm.model, ids, args),
            }
        )
        log(f"{method:16s} {info['target_sparsity']:.2f} ppl {rows[-1]['ppl']:.2f}", t0)
    llm.model.load_state_dict(base)
    return rows


def speed_pair(base_model, model, args) -> dict:
    """Decode/prefill tokens/s of base and pruned alternated --rounds times; medians and the median ratio."""
    cfg = SpeedConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, warmup=1, repeats=3)
    b, p = [], []
    for _ in range(args.rounds):
        b.append(measure_speed(base_model, cfg))
        p.append(measure_speed(model, cfg))
    ratio = statistics.median(y["decode_tokens_per_s"] / x["decode_tokens_per_s"] for x, y in zip(b, p))
    return {
        "decode_tps_base": statistics.median(x["decode_tokens_per_s"] for x in b),
        "decode_tps": statistics.median(y["decode_tokens_per_s"] for y in p),
        "decode_speedup": ratio,
        "prefill_speedup": statistics.median(
            y["prefill_tokens_per_s"] / x["prefill_tokens_per_s"] for x, y in zip(b, p)
        ),
    }


def structured(llm, ids: list[int], calib: torch.Tensor, args, t0: float) -> list[dict]:
    """Each structured variant: prune a copy, save, reload with slimlm.load, check logits, ppl, params, speed."""
    variants = {
        "mlp 25% uniform": lambda m: prune_mlp_channels_(m, 0.25, calib, uniform=True),
        "mlp 25% non-uniform": lambda m: prune_mlp_channels_(m, 0.25, calib, uniform=False),
        "kv groups 25% non-uniform": lambda m: prune_heads_(m, 0.25, calib, uniform=False),
        "drop 4 layers": lambda m: prune_layers_(m, 4, calib),
    }
    rows, probe = [], torch.tensor([ids[:64]])
    for name, fn in variants.items():
        if args.only and not any(o in name for o in args.only):
            continue
        model = copy.deepcopy(llm.model)
        info = fn(model)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_folder(model, Path(tmp) / "m", llm.tokenizer)
            again = slimlm.load(str(Path(tmp) / "m"), dtype="fp32").model
        with torch.no_grad():
            same = torch.equal(model(probe), again(probe))
        del model
        row = {
            "variant": name,
            "params": info["params_after"],
            "params_base": info["params_before"],
            "reload_identical": same,
            "uniform_config": again.config.layer_sizes is None,
            "ppl": ppl(again, ids, args),
            **speed_pair(llm.model, again, args),
            "detail": {k: v for k, v in info.items() if k in ("per_layer_after", "dropped")},
        }
        rows.append(row)
        log(f"{name:26s} ppl {row['ppl']:.2f} params {row['params']:,} decode x{row['decode_speedup']:.2f}", t0)
    return rows


def plot(rows: list[dict], base_ppl: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("magnitude", "o-"), ("wanda", "s-")):
        pts = [(0.0, base_ppl)] + [(r["target"], r["ppl"]) for r in rows if r["method"] == method and r["target"] > 0]
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], style, label=f"{method} (per layer)")
    for r in rows:
        if ":" in r["method"]:
            ax.plot(
                100 * r["target"] + (1 if "wanda" in r["method"] else -1),
                r["ppl"],
                "x" if "2:4" in r["method"] else "+",
                markersize=9,
                label=r["method"],
            )
    ax.set(
        yscale="log",
        xlabel="sparsity of block linears (%)",
        ylabel="held-out perplexity (log)",
        title="SmolLM2-135M-Instruct: pruning",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="scored held-out tokens per perplexity")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="base/pruned speed pairs per structured variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="structured variants whose name contains one of these")
    ap.add_argument("--json", default="bench/results/prune.json")
    ap.add_argument("--plot", default="bench/results/prune_ppl.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = slimlm.load(args.model, dtype="fp32")
    ids = llm.tokenizer.encode(builtin_corpus("heldout"))
    calib = calibration_ids(llm.tokenizer, None, args.calib_samples, args.calib_seq_len)
    base = {k: v.clone() for k, v in llm.model.state_dict().items()}
    out = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    out["sweep"] = [] if args.skip_sweep else sweep(llm, base, ids, calib, args, t0)
    out["structured"] = structured(llm, ids, calib, args, t0)
    out["seconds"] = time.perf_counter() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    if out["sweep"]:
        plot(out["sweep"], out["sweep"][0]["ppl"], args.plot)
    log(f"wrote {args.json}" + ("" if args.skip_sweep else f" and {args.plot}"), t0)


if __name__ == "__main__":
    main()
