"""eval/: the built-in corpus, the perplexity protocol against direct references, speed, task accuracy, `slimlm eval`.

Everything runs on the shared tiny Llama (vocab 384, context 128) with the tiny tokenizer; the file takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.checkpoint import load_model
from slimlm.eval import corpus
from slimlm.eval.cli import add_eval_commands, format_table, main, read_text
from slimlm.eval.perplexity import perplexity, perplexity_of_ids, sliding_windows
from slimlm.eval.speed import SpeedConfig, disk_size, measure_speed, peak_rss_bytes
from slimlm.eval.task_accuracy import chat_eval_set, generate_answers, task_accuracy
from slimlm.tokenizer import Tokenizer

TEXT = (
    "the quick brown fox jumps over the lazy dog and the cat sat on the mat. tell me a story of the big red "
    "house by the river, the sun and the moon and the star over the mountain. hello world, what is the capital "
    "of France? Paris is a city. how and why did the small blue dog run to the green house?"
)
V = 384  # the tiny tokenizer's vocabulary


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    folder, _ = tiny_llama
    return load_model(folder)[2], Tokenizer.from_pretrained(folder), folder


def reference_ppl(model: nn.Module, ids: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """HF's guide, literally: labels -100 outside the last trg_len tokens, the loss shifted inside each window."""
    stream = torch.tensor(ids)[None]
    nll_sum, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        trg_len = end - prev_end
        x = stream[:, begin:end]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(x).float()
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        nll_sum += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
        n += int((shift_labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n), n


# --- corpus ------------------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_disjoint_and_large_enough():
    cal, held = corpus.builtin_corpus("calibration"), corpus.builtin_corpus("heldout")
    corpus._build.cache_clear()  # assemble again from scratch: same text
    assert corpus.builtin_corpus("calibration") == cal and corpus.builtin_corpus("heldout") == held
    cal_docs, held_docs = corpus.builtin_documents("calibration"), corpus.builtin_documents("heldout")
    assert not set(cal_docs) & set(held_docs)
    assert not any(d in cal for d in held_docs), "a held-out document appears inside the calibration text"
    assert all(corpus.split_of(d) == "calibration" for d in cal_docs)
    assert all(corpus.split_of(d) == "heldout" for d in held_docs)
    assert len(cal) + len(held) >= 300_000 and len(held) >= 60_000 and len(cal) >= 200_000
    assert 0.15 < len(held_docs) / (len(cal_docs) + len(held_docs)) < 0.35
    assert all(len(d) >= corpus.MIN_DOC_CHARS and ">>>" not in d for d in cal_docs + held_docs)
    assert sum(c.isascii() for c in held) / len(held) > 0.99  # English prose, not binary noise

    info = corpus.corpus_info()
    assert info["missing_modules"] == [] and info["modules"] == len(corpus.STDLIB_MODULES)
    assert info["heldout"]["documents"] == len(held_docs) and info["calibration"]["characters"] == len(cal)
    assert list(corpus.STDLIB_MODULES) == sorted(corpus.STDLIB_MODULES)
    with pytest.raises(ValueError, match="unknown corpus split"):
        corpus.builtin_corpus("test")


def test_clean_docstring_keeps_prose_only():
    doc = """Return the thing.

        This function returns   the thing that
        was asked for, nothing else.

        >>> f(1)
        2

        a = {1: 2}
    """
    assert corpus.clean_docstring(doc) == "This function returns the thing that was asked for, nothing else."


# --- windows -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 5), (100, 16, 16), (17, 16, 16), (16, 16, 1), (7, 16, 8)])
def test_sliding_windows_score_each_token_at_most_once(n, seq_len, stride):
    windows = sliding_windows(n, seq_len, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert len(scored) == len(set(scored)) and all(w.length <= seq_len for w in windows)
    assert all(w.begin < w.score_from < w.end for w in windows)
    if stride < seq_len:
        assert scored == list(range(1, n))  # every token but the first, in order
        assert all(w.score_from - w.begin >= min(seq_len - stride, w.score_from) for w in windows)
    else:
        assert len(scored) == n - 1 - len(range(stride, n, stride))  # each later window's first is context


def test_sliding_windows_max_tokens_and_errors():
    for cap in (1, 7, 50, 99, 500):
        windows = sliding_windows(100, 16, 4, max_tokens=cap)
        assert sum(w.scored for w in windows) == min(cap, 99)
    for kwargs, msg in [
        (dict(seq_len=1, stride=1), "seq_len must be at least 2"),
        (dict(seq_len=8, stride=9), "stride must be in"),
        (dict(seq_len=8, stride=0), "stride"),
        (dict(seq_len=8, stride=8, max_tokens=0), "max_tokens"),
    ]:
        with pytest.raises(ValueError, match=msg):
            sliding_windows(100, **kwargs)
    with pytest.raises(ValueError, match="at least 2"):
        sliding_windows(1, 8, 8)


# --- perplexity --------------------------------------------------------------------------------------------------


def test_perplexity_equals_direct_reference(tiny):
    model, tok, _ = tiny
    ids = tok.encode(TEXT)
    assert 60 < len(ids) < 128
    # One window holding the whole text: exp(mean NLL of tokens 1..N-1).
    res = perplexity(model, tok, TEXT, seq_len=128, stride=128, progress=False)
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).float()[0]
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    assert res["tokens_scored"] == len(ids) - 1 and res["tokens_total"] == len(ids) and res["windows"] == 1
    assert res["nll"] == pytest.approx(nll, rel=1e-5) and res["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert res["ppl"] > 1 and res["dtype"] == "float32" and res["seq_len"] == 128
    # Sliding windows, overlapping and disjoint, against HF's loop; batching and chunking change nothing.
    for seq_len, stride in [(32, 8), (32, 32), (20, 7)]:
        want, n = reference_ppl(model, ids, seq_len, stride)
        for batch_size, chunk_size in [(1, 512), (3, 5)]:
            got = perplexity(
                model,
                tok,
                TEXT,
                seq_len=seq_len,
                stride=stride,
                batch_size=batch_size,
                chunk_size=chunk_size,
                progress=False,
            )
            assert got["tokens_scored"] == n and got["ppl"] == pytest.approx(want, rel=1e-5), (seq_len, stride)
    assert n == len(ids) - 1  # stride < seq_len: every token but the first scored once


def test_perplexity_max_tokens(tiny):
    model, tok, _ = tiny
    ids = tok.encode(TEXT)
    res = perplexity(model, tok, TEXT, seq_len=128, stride=128, max_tokens=10, progress=False)
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).float()[0]
    nll = F.cross_entropy(logits[:10], torch.tensor(ids[1:11])).item()
    assert res["tokens_scored"] == 10 and res["nll"] == pytest.approx(nll, rel=1e-5)
    assert perplexity(model, tok, TEXT, seq_len=16, stride=4, max_tokens=37, progress=False)["tokens_scored"] == 37


def test_perplexity_uniform_and_perfect_models(tiny):
    _, tok, folder = tiny
    uniform = load_model(folder)[2]
    assert uniform.lm_head.weight is not uniform.embed_tokens.weight  # untied: zeroing the head keeps embeddings
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # all logits 0: every token has probability 1/V
    res = perplexity(uniform, tok, TEXT, seq_len=32, stride=16, progress=False)
    assert res["ppl"] == pytest.approx(V, rel=1e-5) and res["nll"] == pytest.approx(math.log(V), rel=1e-6)

    class NextIsPlusOne(nn.Module):
        """No hidden/lm_head (the model(ids) path): puts all mass on id + 1, right for the stream 0, 1, 2, ..."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(50.0))

        def forward(self, ids):  # [B, T] -> [B, T, V]
            return self.scale * F.one_hot((ids + 1) % V, V).float()

    perfect = perplexity_of_ids(NextIsPlusOne(), list(range(100)), seq_len=16, stride=4, batch_size=2, progress=False)
    assert perfect["ppl"] == pytest.approx(1.0, abs=1e-6) and perfect["tokens_scored"] == 99
    wrong = perplexity_of_ids(NextIsPlusOne(), list(range(100))[::-1], seq_len=16, stride=16, progress=False)
    assert wrong["nll"] == pytest.approx(50 + math.log1p((V - 1) * math.exp(-50)), rel=1e-4)  # every guess wrong


def test_perplexity_bad_input_and_train_mode(tiny):
    model, tok, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, "  \n", progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        perplexity(model, tok, TEXT, seq_len=256, stride=256, progress=False)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        perplexity(model, tok, TEXT, seq_len=1, stride=1, progress=False)
    with pytest.raises(ValueError, match="token ids must be in"):
        perplexity_of_ids(model, [1, 2, V + 5], seq_len=8, stride=8, progress=False)
    model.train()
    try:
        perplexity(model, tok, TEXT, seq_len=32, stride=32, max_tokens=5, progress=False)
        assert model.training
    finally:
        model.eval()


# --- speed, tasks ------------------------------------------------------------------------------------------------


def test_speed_and_footprint(tiny, tmp_path):
    model, _, folder = tiny
    res = measure_speed(model, SpeedConfig(prompt_tokens=8, new_tokens=4, warmup=1, repeats=2))
    assert res["prefill_tokens_per_s"] > 0 and res["decode_tokens_per_s"] > 0
    assert res["decode_s"] > 0 and res["prompt_tokens"] == 8 and res["new_tokens"] == 4
    assert disk_size(folder) == sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert disk_size(folder / "model.safetensors") > 4 * 100_000  # ~130k fp32 parameters
    assert peak_rss_bytes() > 50 * 2**20  # torch alone is more
    with pytest.raises(FileNotFoundError):
        disk_size(tmp_path / "nothing")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        measure_speed(model, SpeedConfig(prompt_tokens=120, new_tokens=20))
    with pytest.raises(ValueError, match="new_tokens must be at least 1"):
        measure_speed(model, SpeedConfig(new_tokens=0))


def _task_file(tiny, path):
    """Four chat records: the first two reference the model's own greedy answer, the last two a wrong one."""
    model, tok, _ = tiny
    prompts = [[{"role": "user", "content": c}] for c in ("hello world", "tell me a story", "the cat", "what is")]
    answers = generate_answers(model, tok, prompts, max_new_tokens=4)
    refs = answers[:2] + [a + " not this" for a in answers[2:]]
    path.write_text(
        "".join(
            json.dumps({"messages": p + [{"role": "assistant", "content": r}]}) + "\n" for p, r in zip(prompts, refs)
        )
    )
    return path


def test_task_accuracy(tiny, tmp_path):
    model, tok, _ = tiny
    path = _task_file(tiny, tmp_path / "task.jsonl")
    assert len(chat_eval_set(path)) == 4
    res = task_accuracy(model, tok, path, max_new_tokens=4)
    assert res["accuracy"] == 0.5 and res["n"] == 4 and res["metric"] == "exact_match"
    assert task_accuracy(model, tok, path, limit=2, max_new_tokens=4)["accuracy"] == 1.0
    assert task_accuracy(model, tok, path, metric="extract_json", max_new_tokens=4)["metric"] == "extract_json"
    with pytest.raises(ValueError, match="unknown task metric"):
        task_accuracy(model, tok, path, metric="nope")
    with pytest.raises(FileNotFoundError):
        task_accuracy(model, tok, tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text('{"text": "no chat here"}\n')
    with pytest.raises(ValueError, match="no chat record"):
        task_accuracy(model, tok, tmp_path / "empty.jsonl")


# --- command line ------------------------------------------------------------------------------------------------


def test_cli_end_to_end(tiny, tmp_path, capsys):
    model, tok, folder = tiny
    parser = argparse.ArgumentParser(prog="slimlm")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    task = _task_file(tiny, tmp_path / "task.jsonl")
    out = tmp_path / "res" / "eval.json"
    args = parser.parse_args(
        [
            "eval",
            "--model",
            str(folder),
            "--dtype",
            "fp32",
            "--ppl",
            "--ppl-tokens",
            "150",
            "--seq-len",
            "64",
            "--stride",
            "32",
            "--task",
            str(task),
            "--max-new-tokens",
            "4",
            "--speed",
            "--speed-prompt",
            "8",
            "--speed-new",
            "4",
            "--speed-repeats",
            "1",
            "--json",
            str(out),
            "-q",
        ]
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 3 and table[0].startswith("| model") and "ppl" in table[0] and "decode tok/s" in table[0]
    res = json.loads(out.read_text())
    p = res["perplexity"]
    assert p["tokens_scored"] == 150 and (p["seq_len"], p["stride"]) == (64, 32) and p["text"] == "builtin:heldout"
    assert p["corpus"]["heldout"]["sha256"] == corpus.corpus_info()["heldout"]["sha256"]
    want = perplexity(
        model, tok, corpus.builtin_corpus("heldout"), seq_len=64, stride=32, max_tokens=150, progress=False
    )
    assert p["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert res["task"]["accuracy"] == 0.5 and res["speed"]["decode_tokens_per_s"] > 0
    assert res["speed"]["model_bytes"] == disk_size(folder) and res["memory"]["peak_rss_bytes"] > 0
    assert format_table(res).splitlines()[2] == table[2]


def test_cli_text_file_and_errors(tiny, tmp_path, capsys):
    _, _, folder = tiny
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": TEXT}) + "\n")
    assert read_text(tmp_path / "t.jsonl") == "hello world\n\n" + TEXT
    (tmp_path / "t.txt").write_text(TEXT)
    assert (
        main(
            [
                "--model",
                str(folder),
                "--ppl",
                str(tmp_path / "t.txt"),
                "--seq-len",
                "32",
                "-q",
                "--json",
                str(tmp_path / "o.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "o.json").read_text())["perplexity"]["text"] == str(tmp_path / "t.txt")
    capsys.readouterr()
    for argv, msg in [
        (["--ppl", str(tmp_path / "missing.txt")], "no such text file"),
        (["--ppl", "--seq-len", "1"], "seq_len must be at least 2"),
        (["--task", str(tmp_path / "t.jsonl"), "--task-metric", "nope"], "unknown --task-metric"),
        (["--ppl", str(tmp_path / "t.txt"), "--seq-len", "512"], "exceeds the model's context"),
    ]:
        assert main(["--model", str(folder), "-q", *argv]) == 2, argv
        assert msg in capsys.readouterr().err
