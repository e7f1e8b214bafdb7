"""Single-stream decode and prefill speed of slimlm vs HF transformers vs llama.cpp, on CPU, in one process.

    .venv/bin/python bench/bench_generate.py                                   # the full run (~15 min on 2 cores)
    .venv/bin/python bench/bench_generate.py --reps 2 --new-tokens 32          # a quick check
    .venv/bin/python bench/bench_generate.py --engines slimlm-fp32,hf-fp32,llama.cpp --json out/bench.json

What is measured (see /work/shared/BENCHMARKING.md):
  * decode tok/s = (n - 1) / (t_last_token - t_first_token): prefill excluded, n forced to --new-tokens for every
    engine (slimlm ignore_eos=True; HF min_new_tokens=max_new_tokens; llama.cpp's token generator never stops on EOS),
    greedy, from a short prompt (--decode-prompt-tokens);
  * prefill tok/s = prompt tokens / time to first token, on the same --prompt-tokens token ids for every engine, with
    one new token.
Engines are set up and warmed up one after another, then measured alternately (A, B, C, ... per repetition), and the
median over --reps repetitions is reported. Ratios are medians of the per-repetition ratios of paired runs (the runs of
one repetition are seconds apart, so a slow spell of the machine hits both sides of a ratio alike).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL = "smollm2-135m"

# A fixed English text (written for this benchmark), repeated as needed and cut to the prompt length in tokens.
TEXT = """\
The lighthouse at the end of the harbour wall was built in the spring of 1853, after a winter in which three fishing \
boats were lost on the rocks within sight of the town. The townspeople raised the money themselves: the baker gave a \
week of his earnings, the schoolmaster organised a concert, and the widow of one of the drowned fishermen went from \
door to door with a tin box and a list of names. The engineer who came from the capital to draw the plans was a quiet \
man who spent his evenings walking along the shore, measuring the height of the waves with a long pole marked in feet \
and inches. He decided that the tower should stand on a base of granite blocks, each one cut to fit its neighbours so \
closely that no mortar was needed, and that the lamp should burn whale oil until something better could be found.

For the first forty years the light was kept by a single family. The keeper climbed the one hundred and twelve steps \
four times each night to trim the wick, wind the clockwork that turned the lens, and write in the log the state of the \
weather, the ships that passed and anything else that seemed worth remembering. His daughter, who learned to read from \
those logs, later wrote that the most frightening nights were not the stormy ones but the calm, foggy ones, when the \
sea made no sound at all and the fog bell had to be rung by hand every thirty seconds until morning. On one such night \
in 1871 she rang it for eleven hours while her father was ill, and a steamer carrying two hundred passengers found its \
way into the harbour by the sound alone.

Paraffin replaced whale oil in the 1880s, and electricity arrived in 1923, carried along the harbour wall on wooden \
poles that the winter gales knocked down almost every year. The keepers complained that the electric lamp was less \
reliable than the old flame, and for a decade they kept a paraffin lamp ready in the lantern room, just in case. When \
the light was finally automated in 1968, the last keeper handed the keys to the harbour master, walked down the steps \
for the final time and, according to the local newspaper, did not look back. The tower still stands today. Its lamp is \
now a small cluster of light-emitting diodes, powered by a solar panel and checked once a month by a technician who \
drives out from the city, but the granite base has not moved an inch since the day it was laid, and on foggy nights \
the children of the town still like to say that they can hear a bell ringing somewhere out on the water.
"""

ENGINES = [
    "slimlm-int8",
    "slimlm-fp32",
    "slimlm-bf16",
    "slimlm-bf16-compiled",
    "slimlm-fp32-compiled",
    "hf-fp32",
    "hf-bf16",
    "llama.cpp",
]
OPTIONAL_ENGINES = [
    "hf-fp32-autocast-bf16"
]  # HF fp32 weights under torch.autocast(bf16): for CPUs with AMX/AVX512-BF16
PEERS = [("hf-bf16", "HF bf16"), ("hf-fp32", "HF fp32"), ("llama.cpp", "llama.cpp")]


@dataclass
class Run:
    """One timed generation."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # time to first token
    decode_s: float  # first token -> last token
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s


class Engine:
    name = ""
    settings = ""
    weights = ""
    compiled = False

    def setup(self, ctx: Context) -> None:
        raise NotImplementedError

    def run(self, ids: list[int], new_tokens: int) -> Run:
        raise NotImplementedError


class Context:
    """What engines share: thread count, the model's HF folder (for transformers), the GGUF (for llama.cpp)."""

    def __init__(self, threads: int, n_ctx: int):
        self.threads, self.n_ctx = threads, n_ctx

    @property
    def hf_folder(self) -> Path:
        from slimlm.checkpoint import model_folder

        return model_folder(MODEL)

    @property
    def gguf(self) -> Path:
        from slimlm.checkpoint import resolve

        return resolve(MODEL)


class SlimLM(Engine):
    def __init__(self, dtype: str, compiled: bool, quantize: str | None = None):
        self.dtype, self.compiled, self.quantize = dtype, compiled, quantize
        self.name = f"slimlm-{quantize or dtype}" + ("-compiled" if compiled else "")
        self.settings = (
            f"{dtype} activations, "
            + ("model forward torch.compile'd (inductor, freezing)" if compiled else "eager")
            + ", engine defaults (fused CPU decode step where the model qualifies)"
        )
        self.weights = (
            f"{dtype} (dequantized from the GGUF)"
            if quantize is None
            else f"{quantize} weight-only, per-channel scales (re-quantized from the GGUF's dequantized weights)"
        )

    def setup(self, ctx: Context) -> None:
        import dataclasses

        import slimlm

        self.llm = slimlm.load(MODEL, dtype=self.dtype, compile=self.compiled, quantize=self.quantize)
        # Every run prefills the same prompt from scratch, as llama.cpp does after reset(): no prefix cache.
        self.llm.engine_config = dataclasses.replace(self.llm.engine_config, prefix_cache=False)

    def run(self, ids: list[int], new_tokens: int) -> Run:
        c = self.llm.complete([list(ids)], max_new_tokens=new_tokens, ignore_eos=True)[0]
        assert c.prompt_tokens == len(ids) and c.completion_tokens == new_tokens, (c.prompt_tokens, c.completion_tokens)
        return Run(c.prompt_tokens, c.completion_tokens, c.prefill_s, c.decode_s, c.token_ids)


class _Timer:
    """A transformers streamer that timestamps tokens: generate() puts the prompt first, then each new token."""

    def __init__(self):
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:
            return  # the prompt
        self.stamps.append(time.perf_counter())
        self.tokens.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class HF(Engine):
    def __init__(self, dtype: str, autocast: bool = False):
        self.dtype, self.autocast = dtype, autocast
        self.name = f"hf-{dtype}" + ("-autocast-bf16" if autocast else "")
        self.settings = (
            f"transformers {dtype}"
            + (" + torch.autocast(bf16)" if autocast else "")
            + ", generate() greedy, min_new_tokens=max_new_tokens, DynamicCache, eager"
        )
        self.weights = f"{dtype} (same HF folder as slimlm)"

    def setup(self, ctx: Context) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(ctx.hf_folder), dtype=dt).eval()
        attn = getattr(self.model.config, "_attn_implementation", None)
        if attn:
            self.settings = self.settings.replace("DynamicCache", f"DynamicCache, attn={attn}")
        self.eos = self.model.generation_config.eos_token_id

    def run(self, ids: list[int], new_tokens: int) -> Run:
        # prefill time = from calling generate() to the first new token (the prompt's forward pass with use_cache=True
        # plus generate()'s set-up and the first greedy pick), as slimlm's and llama.cpp's time to first token.
        timer = _Timer()
        input_ids = torch.tensor([ids])
        kwargs = dict(
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            streamer=timer,
            pad_token_id=self.eos,
        )
        ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)
        with torch.inference_mode(), ac:
            t0 = time.perf_counter()
            out = self.model.generate(input_ids, **kwargs)
        n = out.shape[1] - len(ids)
        assert n == new_tokens == len(timer.stamps), (n, new_tokens, len(timer.stamps))
        return Run(len(ids), n, timer.stamps[0] - t0, timer.stamps[-1] - timer.stamps[0], timer.tokens)


class LlamaCpp(Engine):
    name = "llama.cpp"
    weights = "Q4_1 GGUF as shipped (4-bit weights: less to read per token than fp32/bf16)"

    def setup(self, ctx: Context) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            str(ctx.gguf),
            n_threads=ctx.threads,
            n_threads_batch=ctx.threads,
            n_ctx=ctx.n_ctx,
            n_batch=512,
            seed=0,
            verbose=False,
        )
        self.settings = (
            f"llama-cpp-python Llama.generate() greedy (temp=0), n_threads={ctx.threads}, "
            f"n_threads_batch={ctx.threads}, n_batch=512, n_ctx={ctx.n_ctx}"
        )

    def run(self, ids: list[int], new_tokens: int) -> Run:
        self.llm.reset()  # n_tokens = 0: no prompt-prefix reuse from the previous run
        toks, stamps = [], []
        t0 = time.perf_counter()
        gen = self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        for tok in gen:  # each token after the first costs one decode; the generator never stops on EOS
            stamps.append(time.perf_counter())
            toks.append(tok)
            if len(toks) == new_tokens:
                break
        gen.close()
        return Run(len(ids), len(toks), stamps[0] - t0, stamps[-1] - stamps[0], toks)


def make_engine(name: str) -> Engine:
    if name.startswith("slimlm-"):
        parts = name.split("-")
        if parts[1] in ("int8", "int4"):
            return SlimLM("fp32", compiled=parts[-1] == "compiled", quantize=parts[1])
        return SlimLM(parts[1], compiled=parts[-1] == "compiled")
    if name == "hf-fp32-autocast-bf16":
        return HF("fp32", autocast=True)
    if name.startswith("hf-"):
        return HF(name.split("-")[1])
    if name == "llama.cpp":
        return LlamaCpp()
    raise SystemExit(f"unknown engine {name!r}; choose from {', '.join(ENGINES + OPTIONAL_ENGINES)}")


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = TEXT
    ids = tokenizer.encode(text)
    while len(ids) < n:
        text += "\n" + TEXT
        ids = tokenizer.encode(text)
    return ids[:n]


def machine_info(threads: int) -> dict:
    flags, model = set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "cpu_flags": {f: f in flags for f in wanted},
        "onednn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict:
    import numpy
    import transformers

    import slimlm

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "slimlm": slimlm.__version__,
    }
    try:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    except (ImportError, OSError):  # not installed, or installed without its shared library (see LLAMA_CPP_LIB_PATH)
        out["llama_cpp_python"] = None
    try:
        import subprocess

        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "slimlm"], capture_output=True, text=True
        )
        out["slimlm_git"] = sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return out


def command_line() -> str:
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        exe = rel if not rel.startswith("..") else exe
    except ValueError:
        pass
    return shlex.join([exe] + sys.argv)


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:,.{digits}f}"


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated subset of: {', '.join(ENGINES)} (default: all); also available: "
        f"{', '.join(OPTIONAL_ENGINES)}",
    )
    ap.add_argument("--reps", type=int, default=5, help="measured repetitions per engine (median reported; default 5)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode run (default 128)")
    ap.add_argument("--prompt-tokens", type=int, default=450, help="prompt length of the prefill runs (default 450)")
    ap.add_argument(
        "--decode-prompt-tokens", type=int, default=32, help="prompt length of the decode runs (default 32)"
    )
    ap.add_argument(
        "--warmup-tokens",
        type=int,
        default=16,
        help="tokens of the warm-up decode of eager engines (compiled ones warm up with --new-tokens, so "
        "that the measured runs reuse the compiled graph; default 16)",
    )
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    ap.add_argument("--json", metavar="OUT", help="write all results (raw runs included) to this JSON file")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    if len(set(names)) != len(names) or not names:
        raise SystemExit("--engines: give each engine once")
    unknown = [n for n in names if n not in ENGINES + OPTIONAL_ENGINES]
    if unknown:
        raise SystemExit(
            f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES + OPTIONAL_ENGINES)}"
        )
    if args.reps < 1 or args.new_tokens < 2 or args.prompt_tokens < 1 or args.decode_prompt_tokens < 1:
        raise SystemExit("--reps >= 1, --new-tokens >= 2, --prompt-tokens >= 1, --decode-prompt-tokens >= 1")

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    info, vers, cmd = machine_info(args.threads), versions(), command_line()
    print(f"command: {cmd}")
    print(
        f"machine: {info['cpu']}, {info['usable_cpus']} usable / {info['logical_cpus']} logical CPUs, "
        f"{args.threads} threads; flags: "
        + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["cpu_flags"].items())
        + f"; oneDNN bf16: {'yes' if info['onednn_bf16_supported'] else 'no'}; load avg at start: "
        + (", ".join(f"{x:.2f}" for x in info["loadavg_at_start"]) if info["loadavg_at_start"] else "?")
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)

    from slimlm.checkpoint import model_folder
    from slimlm.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_folder(MODEL))  # converts the GGUF into the cache once if needed
    long_ids = prompt_ids(tok, args.prompt_tokens)
    short_ids = prompt_ids(tok, args.decode_prompt_tokens)
    if len(long_ids) < args.prompt_tokens:
        raise SystemExit("could not build a prompt that long")
    ctx = Context(
        args.threads,
        n_ctx=-(-max(args.prompt_tokens + 1, args.decode_prompt_tokens + args.new_tokens + 1) // 256) * 256,
    )

    # Set up and warm up each engine (compiled ones compile here: the warm-up decode uses the measured shapes).
    engines: list[Engine] = []
    setup: dict[str, dict] = {}
    graphs_before = _unique_graphs()
    for name in names:
        e = make_engine(name)
        print(f"[setup] {name}: loading ...", flush=True)
        t = time.perf_counter()
        e.setup(ctx)
        load_s = time.perf_counter() - t
        # Warm-up mirrors the measured sequence (decode run, then prefill run); compiled engines do it twice, so
        # that any recompile (e.g. for another KV cache size after the prefill run) also happens here.
        warm_n = args.new_tokens if e.compiled else min(args.warmup_tokens, args.new_tokens)
        t_warm = time.perf_counter()
        first_s = prefill_warm_s = 0.0
        for _i in range(2 if e.compiled else 1):
            t = time.perf_counter()
            e.run(short_ids, warm_n)
            first_s = first_s or time.perf_counter() - t
            t = time.perf_counter()
            e.run(long_ids, 1)
            prefill_warm_s = prefill_warm_s or time.perf_counter() - t
        warm_s = time.perf_counter() - t_warm
        graphs = _unique_graphs()
        setup[name] = {
            "load_s": load_s,
            "first_decode_call_s": first_s,
            "first_prefill_call_s": prefill_warm_s,
            "warmup_s": warm_s,
            "warmup_tokens": warm_n,
            "graphs_compiled": graphs - graphs_before,
        }
        print(
            f"[setup] {name}: load {load_s:.1f} s, first decode call ({warm_n} tokens) {first_s:.1f} s, first "
            f"prefill call {prefill_warm_s:.2f} s, warm-up in all {warm_s:.1f} s"
            + (f", torch.compile graphs compiled: {graphs - graphs_before}" if e.compiled else ""),
            flush=True,
        )
        graphs_before = graphs
        engines.append(e)
    graphs_after_warmup = _unique_graphs()

    # Measure: alternate engines within each repetition.
    decode: dict[str, list[Run]] = {e.name: [] for e in engines}
    prefill: dict[str, list[Run]] = {e.name: [] for e in engines}
    t_start = time.perf_counter()
    for rep in range(args.reps):
        for e in engines:
            decode[e.name].append(e.run(short_ids, args.new_tokens))
        for e in engines:
            prefill[e.name].append(e.run(long_ids, 1))
        print(
            f"[rep {rep + 1}/{args.reps}] "
            + "; ".join(
                f"{e.name} {decode[e.name][-1].decode_tps:.1f}/{prefill[e.name][-1].prefill_tps:.0f}" for e in engines
            )
            + "  (decode/prefill tok/s)",
            flush=True,
        )
    measure_s = time.perf_counter() - t_start
    recompiled = _unique_graphs() - graphs_after_warmup
    if recompiled:
        print(
            f"WARNING: torch.compile compiled {recompiled} new graph(s) during the measured runs; "
            "compiled engines' numbers include compile time",
            flush=True,
        )

    # Summaries.
    dec = {n: [r.decode_tps for r in runs] for n, runs in decode.items()}
    pre = {n: [r.prefill_tps for r in runs] for n, runs in prefill.items()}
    results = {}
    for e in engines:
        # compile time ~ the first decode call (same prompt and length as a measured run) minus a measured run
        steady = statistics.median(r.ttft_s + r.decode_s for r in decode[e.name])
        setup[e.name]["compile_s"] = setup[e.name]["first_decode_call_s"] - steady if e.compiled else None
        results[e.name] = {
            "settings": e.settings,
            "weights": e.weights,
            "compiled": e.compiled,
            "decode_tps_median": statistics.median(dec[e.name]),
            "decode_tps_runs": dec[e.name],
            "prefill_tps_median": statistics.median(pre[e.name]),
            "prefill_tps_runs": pre[e.name],
            "decode_ttft_s_median": statistics.median(r.ttft_s for r in decode[e.name]),
            **setup[e.name],
        }
    ratios = {}
    for e in engines:
        if not e.name.startswith("slimlm-"):
            continue
        ratios[e.name] = {}
        for peer, _ in PEERS:
            if peer in dec:
                ratios[e.name][peer] = {
                    "decode": paired_ratio(dec[e.name], dec[peer]),
                    "prefill": paired_ratio(pre[e.name], pre[peer]),
                }

    # Greedy outputs: how many leading tokens each engine shares with a reference (a cheap sanity check).
    refs = [n for n in ("hf-fp32", "hf-bf16", "slimlm-fp32") if n in decode][:2]
    agree = {
        ref: {n: same_prefix(runs[0].token_ids, decode[ref][0].token_ids) for n, runs in decode.items()} for ref in refs
    }

    print()
    print(
        f"### SmolLM2-135M, CPU, {args.threads} threads: decode and prefill tokens/s "
        f"(median of {args.reps}, min–max in brackets)"
    )
    print()
    print(
        f"Decode: {args.decode_prompt_tokens}-token prompt, {args.new_tokens} new tokens forced, greedy, "
        f"tok/s = (n − 1) / (t_last − t_first). Prefill: {args.prompt_tokens}-token prompt (same ids for every "
        f"engine), tok/s = prompt tokens / time to first token."
    )
    print()
    print("| engine | settings | weights | decode tok/s | prefill tok/s | first decode call s (≈ compile s) |")
    print("|---|---|---|---:|---:|---:|")
    for e in engines:
        r = results[e.name]
        d, p = dec[e.name], pre[e.name]
        first = fmt(r["first_decode_call_s"]) + (f" ({fmt(r['compile_s'])})" if r["compile_s"] is not None else "")
        print(
            f"| {e.name} | {e.settings} | {e.weights} | {fmt(r['decode_tps_median'])} [{fmt(min(d))}–{fmt(max(d))}] | "
            f"{fmt(r['prefill_tps_median'], 0)} [{fmt(min(p), 0)}–{fmt(max(p), 0)}] | {first} |"
        )
    print()
    print(
        "Time to first token, per engine: slimlm = Completion.prefill_s (from LLM.complete() on the token ids to the "
        "first token); HF = from calling generate(max_new_tokens=1) to the first token its streamer receives (the "
        "prompt's forward pass with use_cache=True, generate()'s set-up and the greedy pick); llama.cpp = from "
        "Llama.generate() to its first token (prompt eval + greedy sample). Compile time ≈ first decode call minus "
        "the median measured decode call of the same size."
    )
    if ratios:
        peers = [(p, label) for p, label in PEERS if p in dec]
        if peers:
            print()
            print(
                "Ratios slimlm / peer (median of per-repetition paired ratios; > 1 means slimlm is faster). "
                "llama.cpp runs 4-bit Q4_1 weights, the others fp32/bf16."
            )
            print()
            print(
                "| slimlm engine | "
                + " | ".join(f"decode ×{label}" for _, label in peers)
                + " | "
                + " | ".join(f"prefill ×{label}" for _, label in peers)
                + " |"
            )
            print("|---|" + "---:|" * (2 * len(peers)))
            for n, rs in ratios.items():
                print(
                    f"| {n} | "
                    + " | ".join(f"{rs[p]['decode']:.2f}" for p, _ in peers)
                    + " | "
                    + " | ".join(f"{rs[p]['prefill']:.2f}" for p, _ in peers)
                    + " |"
                )
    print()
    for ref, counts in agree.items():
        print(
            f"Greedy output check: leading tokens identical to {ref}'s (of {args.new_tokens}): "
            + ", ".join(f"{n} {k}" for n, k in counts.items() if n != ref)
        )
    print(
        f"Machine: {info['cpu']}; {args.threads} threads; AVX-512: {'yes' if info['cpu_flags']['avx512f'] else 'no'}, "
        f"AVX512_BF16: {'yes' if info['cpu_flags']['avx512_bf16'] else 'no'}, "
        f"AMX: {'yes' if info['cpu_flags']['amx_bf16'] else 'no'}, oneDNN bf16 supported: "
        f"{'yes' if info['onednn_bf16_supported'] else 'no'}"
        + (
            ""
            if info["onednn_bf16_supported"]
            else " (no native bf16: bf16 matmuls are emulated, expect slow eager bf16)"
        )
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"Command: `{cmd}`")
    print(f"Measured runs took {measure_s:.0f} s; load avg at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))

    if args.json:
        out = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": cmd,
            "machine": info,
            "versions": vers,
            "args": vars(args),
            "results": results,
            "ratios": ratios,
            "greedy_agreement": agree,
            "recompiled_graphs_during_measurement": recompiled,
            "measure_s": measure_s,
            "runs": {
                n: {"decode": [vars(r) for r in decode[n]], "prefill": [vars(r) for r in prefill[n]]} for n in decode
            },
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


def _unique_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


if __name__ == "__main__":
    main()
