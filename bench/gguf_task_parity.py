"""Does a GGUF written by `slimlm export gguf` score the same on a fine-tuned task in llama.cpp as the model in slimlm?

    .venv/bin/python bench/gguf_task_parity.py --model runs/demo/tuned-merged --test runs/demo/task/test.jsonl \
        --n 100 --types q8_0,f16,q4_0

slimlm answers the first --n test prompts greedily from the HF folder (eval.task_accuracy.generation_accuracy). Each
--types file is exported with the CLI's own code path, loaded in llama-cpp-python, and asked through its chat API
(`create_chat_completion`, which renders the chat template embedded in the GGUF and tokenizes with llama.cpp's own
tokenizer: what an Ollama / llama-server user runs), greedy (temperature 0, no repeat penalty), same max tokens.
Both are scored by the same function. Prints a markdown table and the CPU flags llama.cpp was built with.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for lib in sorted(glob.glob(str(REPO / "build/llama.cpp/*/llama.cpp/build/bin/libllama.so"))):
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(Path(lib).parent))  # a libllama built beside the repo


def slimlm_scores(model: str, records, task: str | None, max_new: int) -> tuple[float, list[str]]:
    import slimlm
    from slimlm.eval.task_accuracy import generate_answers

    llm = slimlm.load(model, dtype="fp32")
    answers = generate_answers(llm.model, llm.tokenizer, [p for p, _ in records], max_new)
    return score(answers, records, task), answers


def score(answers: list[str], records, task: str | None) -> float:
    from slimlm.eval.task_accuracy import exact_match

    if task is not None:
        from slimlm.tasks import TASKS

        exact_match = TASKS[task].exact_match
    return sum(exact_match(a, ref) for a, (_, ref) in zip(answers, records)) / max(len(records), 1)


def llama_cpp_answers(path: Path, records, max_new: int, threads: int) -> list[str]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    try:
        out = []
        for messages, _ in records:
            r = llm.create_chat_completion(
                messages=messages,
                temperature=0.0,
                top_k=1,
                top_p=1.0,
                min_p=0.0,
                repeat_penalty=1.0,
                max_tokens=max_new,
            )
            out.append(r["choices"][0]["message"]["content"] or "")
        return out
    finally:
        llm.close()


def export(model: str, out: Path, qtype: str) -> Path:
    from slimlm.checkpoint import resolve
    from slimlm.export.gguf import export_gguf
    from slimlm.llm import load

    llm = load(model, dtype="fp32")
    export_gguf(llm.model, llm.tokenizer.hf, llm.path, out, qtype, source=resolve(model), name=model, progress=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo/tuned-merged")
    ap.add_argument("--test", default="runs/demo/task/test.jsonl")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--types", default="q8_0,f16,q4_0")
    ap.add_argument(
        "--task", default="extract_json", help="bundled task whose metric scores answers ('' = exact string match)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, help="folder to keep the GGUF files in (default: a temporary one)")
    args = ap.parse_args()
    import llama_cpp
    import torch

    from slimlm.eval.task_accuracy import chat_eval_set

    torch.set_num_threads(args.threads)
    records = chat_eval_set(args.test)[: args.n]
    task = args.task or None
    t0 = time.perf_counter()
    ours, our_answers = slimlm_scores(args.model, records, task, args.max_new_tokens)
    print(f"slimlm: EM {ours:.1%} on {len(records)} prompts ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for qtype in args.types.split(","):
            t1 = time.perf_counter()
            path = export(args.model, folder / f"model-{qtype}.gguf", qtype)
            answers = llama_cpp_answers(path, records, args.max_new_tokens, args.threads)
            theirs = score(answers, records, task)
            same = sum(a.strip() == b.strip() for a, b in zip(answers, our_answers)) / max(len(records), 1)
            rows.append((qtype, path.stat().st_size / 2**20, ours, theirs, same))
            print(f"{qtype}: llama.cpp EM {theirs:.1%} ({time.perf_counter() - t1:.0f} s)", file=sys.stderr)
    print(
        f"\nmodel {args.model}, {len(records)} prompts of {args.test}, greedy, max {args.max_new_tokens} new tokens, "
        f"metric: {task or 'exact string match'}; llama-cpp-python {llama_cpp.__version__}\n"
    )
    print("| type | file MiB | slimlm EM | llama.cpp EM | diff | same answer as slimlm |")
    print("|---|---:|---:|---:|---:|---:|")
    for qtype, mib, a, b, same in rows:
        print(f"| {qtype} | {mib:.1f} | {a:.1%} | {b:.1%} | {100 * (b - a):+.1f} pt | {same:.0%} |")
    print(f"\nCPU flags (llama.cpp): {llama_cpp.llama_print_system_info().decode().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
