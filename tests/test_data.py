"""train/data.py: rendering and loss masks per format, shifted labels, truncation, packing, and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimlm.tokenizer import Tokenizer
from slimlm.train.batch import IGNORE, collate
from slimlm.train.data import DataConfig, DataError, check_file, load_dataset, pack, read_jsonl, render, to_sample

SYSTEM = {"role": "system", "content": "tell me a story"}
CHAT = [
    SYSTEM,
    {"role": "user", "content": "what is Paris?"},
    {"role": "assistant", "content": "the capital of France"},
    {"role": "user", "content": "and the moon?"},
    {"role": "assistant", "content": "a big star, 42"},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def plain_tok(tokenizer_dir: Path) -> Tokenizer:
    """The same tokenizer without a chat template."""
    t = Tokenizer.from_pretrained(tokenizer_dir)
    t.hf.chat_template = None
    return t


def write_jsonl(folder: Path, rows: list, name: str = "data.jsonl") -> Path:
    """rows: dicts (dumped as JSON) or raw strings (written as they are)."""
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_runs(tok: Tokenizer, ids: list[int], trained: list[bool]) -> list[str]:
    """Decoded text of each run of consecutive trained tokens (special tokens kept)."""
    runs, cur = [], []
    for i, t in zip(ids, trained):
        if t:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_chat_trains_each_assistant_turn_and_its_end_of_turn(tok):
    ids, trained = render({"messages": CHAT}, "chat", tok)
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=False)
    # Both assistant turns, each with <|im_end|>; the user turn between and ChatML's newline after are not trained.
    assert trained_runs(tok, ids, trained) == ["the capital of France<|im_end|>", "a big star, 42<|im_end|>"]
    assert ids[-1] == tok.encode("\n", add_special_tokens=False)[0] and not trained[-1]


def test_to_sample_shifts_flags_into_labels(tok):
    assert to_sample([5, 6, 7, 8], [False, False, True, True], 10).labels == [IGNORE, 7, 8, IGNORE]
    ids, trained = render({"messages": CHAT}, "chat", tok)
    s = to_sample(ids, trained, 1000)
    assert s.input_ids == ids and s.labels[-1] == IGNORE
    assert s.labels[:-1] == [nxt if t else IGNORE for nxt, t in zip(ids[1:], trained[1:])]
    assert s.num_trained == sum(trained[1:])


def test_prompt_completion_trains_completion_and_eos(tok):
    prompt, completion = "the cat sat on", " the mat"
    ids, trained = render({"prompt": prompt, "completion": completion}, "prompt_completion", tok)
    eos = tok.hf.eos_token_id
    p = tok.encode(prompt, add_special_tokens=True)
    assert ids == p + tok.encode(completion, add_special_tokens=False) + [eos]  # parts tokenized separately
    assert trained == [False] * len(p) + [True] * (len(ids) - len(p))
    assert trained_runs(tok, ids, trained) == [" the mat<|im_end|>"]
    # A completion that already ends with EOS does not get a second one.
    ids2, _ = render({"prompt": prompt, "completion": completion + "<|im_end|>"}, "prompt_completion", tok)
    assert ids2 == ids


def test_text_trains_everything_with_eos(tok):
    ids, trained = render({"text": "hello world"}, "text", tok)
    assert ids == tok.encode("hello world") + [tok.hf.eos_token_id] and all(trained)


def test_alpaca_uses_the_chat_template_when_there_is_one(tok):
    record = {"instruction": "tell me a story", "input": "the red fox", "output": "the fox ran"}
    ids, trained = render(record, "alpaca", tok)
    messages = [
        {"role": "user", "content": "tell me a story\n\nthe red fox"},
        {"role": "assistant", "content": "the fox ran"},
    ]
    assert (ids, trained) == render({"messages": messages}, "chat", tok)
    assert trained_runs(tok, ids, trained) == ["the fox ran<|im_end|>"]


def test_alpaca_without_template_uses_the_alpaca_prompt(plain_tok):
    ids, trained = render({"instruction": "tell me a story", "input": "", "output": "the fox ran"}, "alpaca", plain_tok)
    text = plain_tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("Below is an instruction") and "### Input:" not in text
    assert text.endswith("### Response:\nthe fox ran<|im_end|>")
    assert trained_runs(plain_tok, ids, trained) == ["the fox ran<|im_end|>"]


def test_train_on_prompt_trains_every_token(tok):
    for record, fmt in [({"messages": CHAT}, "chat"), ({"prompt": "a", "completion": "b"}, "prompt_completion")]:
        ids, trained = render(record, fmt, tok, train_on_prompt=True)
        assert all(trained) and to_sample(ids, trained, 1000).num_trained == len(ids) - 1  # first is no target


def test_truncation_and_dropped_counts(tok, tmp_path):
    long = " ".join(["the cat sat on the mat"] * 20)
    path = write_jsonl(
        tmp_path,
        [
            {"prompt": "hello", "completion": " world"},  # fits
            {"prompt": "hello", "completion": long},  # cut, still trained
            {"prompt": long, "completion": " world"},
        ],
    )  # cut inside the prompt: dropped
    with pytest.warns(UserWarning, match="dropped 1 of 3 records"):
        samples, stats = load_dataset(path, tok, DataConfig(max_seq_len=16))
    assert (stats.records, stats.samples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert [len(s.input_ids) for s in samples][1] == 16 and samples[1].labels[-1] == IGNORE
    assert stats.tokens == sum(len(s.input_ids) for s in samples)
    assert stats.trained_tokens == sum(s.num_trained for s in samples) and stats.format == "prompt_completion"


def test_pack_keeps_samples_whole_and_in_order(tok):
    samples = [to_sample(*render({"text": "the cat " * k}, "text", tok), 20) for k in (1, 5, 3, 9, 2, 7, 1)]
    rows = pack(samples, 20)
    assert all(len(r.input_ids) <= 20 for r in rows) and len(rows) < len(samples)
    unpacked = []
    for r in rows:
        segs = r.segment_ids
        assert segs[0] == 0 and all(b - a in (0, 1) for a, b in zip(segs, segs[1:]))
        for seg in range(segs[-1] + 1):
            idx = [i for i, s in enumerate(segs) if s == seg]
            unpacked.append(([r.input_ids[i] for i in idx], [r.labels[i] for i in idx]))
    assert unpacked == [(s.input_ids, s.labels) for s in samples]  # none split, none reordered
    batch = collate(rows, tok.pad_id)
    T = batch["input_ids"].shape[1]
    for b, r in enumerate(rows):  # real tokens keep their segment ids; padding gets -1
        assert batch["segment_ids"][b].tolist() == r.segment_ids + [-1] * (T - len(r.input_ids))


def test_load_dataset_packs_when_asked(tok, tmp_path):
    path = write_jsonl(tmp_path, [{"messages": CHAT}] * 4)
    rows, stats = load_dataset(path, tok, DataConfig(max_seq_len=256, packing=True))
    assert stats.samples == 4 and stats.rows == len(rows) < 4 and all(r.segment_ids for r in rows)


def test_read_jsonl_lists_every_bad_line(tmp_path):
    path = write_jsonl(
        tmp_path,
        [
            {"messages": CHAT, "fields": {"extra": 1}},  # 1: fine, extra keys are ignored
            "{not json",  # 2
            "[1, 2]",  # 3
            "   ",  # 4: blank, skipped
            {"question": "q", "answer": "a"},  # 5
            {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # 6
            {"messages": [{"role": "user", "content": "hi"}]},  # 7
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": 3}]},  # 8
            {"prompt": "p", "text": "t"},  # 9
        ],
    )
    with pytest.raises(DataError, match=r"8 problem\(s\)") as e:
        read_jsonl(path)
    msg = str(e.value)
    for expected in [
        f"{path}:2: invalid JSON",
        f"{path}:3: a list, not a JSON object",
        f"{path}:5: unknown record shape",
        f"{path}:6: messages[0].role is 'bot'; use one of system, user, assistant",
        f"{path}:7: no assistant turn",
        f"{path}:8: messages[0]: field 'content' is empty",
        f"{path}:8: messages[1]: field 'content' must be a string",
        f"{path}:9: ambiguous record: has keys of formats prompt_completion, text",
    ]:
        assert expected in msg
    assert f"{path}:1:" not in msg and f"{path}:4:" not in msg


def test_read_jsonl_rejects_mixed_formats_and_checks_forced_format(tmp_path):
    path = write_jsonl(
        tmp_path, [{"messages": CHAT}, {"text": "a"}, {"messages": CHAT}, {"prompt": "p", "completion": "c"}]
    )
    with pytest.raises(DataError, match=rf"{path}:2: a text record, but line 1 is chat; put one format per file") as e:
        read_jsonl(path)
    assert f"{path}:4: a prompt_completion record" in str(e.value) and f"{path}:3" not in str(e.value)
    with pytest.raises(DataError, match=rf"{path}:1: missing field 'text'"):
        read_jsonl(path, format="text")
    alpaca = write_jsonl(
        tmp_path, [{"instruction": "i", "output": "o"}, {"instruction": "i", "input": "", "output": "o"}]
    )
    assert [(n, fmt) for n, _, fmt in read_jsonl(alpaca)] == [(1, "alpaca"), (2, "alpaca")]


def test_chat_needs_a_chat_template(plain_tok, tmp_path):
    path = write_jsonl(tmp_path, [{"messages": CHAT}])
    with pytest.raises(DataError, match="no chat template.*prompt/completion or text format"):
        load_dataset(path, plain_tok, DataConfig())


def test_template_that_breaks_prefixes_is_reported(tokenizer_dir, tmp_path):
    t = Tokenizer.from_pretrained(tokenizer_dir)
    t.hf.chat_template = "{{ messages | length }}" + t.hf.chat_template  # the turn count changes every prefix
    path = write_jsonl(tmp_path, [{"messages": CHAT}])
    with pytest.raises(DataError, match=rf"{path}:1: the chat template renders messages\[2\] differently"):
        load_dataset(path, t, DataConfig())


def test_check_file_reports_counts_and_a_marked_sample(tok, tmp_path):
    path = write_jsonl(tmp_path, [{"messages": CHAT}, {"messages": CHAT[:3]}])
    report = check_file(path, tok, DataConfig(max_seq_len=512))
    assert "2 records, format chat" in report and "0 truncated, 0 dropped" in report and "median" in report
    assert "<|im_start|>assistant\n[[the capital of France<|im_end|>]]\n<|im_start|>user" in report
    assert "\x1b[32ma big star, 42<|im_end|>\x1b[0m" in check_file(path, tok, DataConfig(), color=True)


def test_data_config_lists_all_errors():
    with pytest.raises(DataError, match="max_seq_len must be an integer >= 2") as e:
        DataConfig(max_seq_len=1, packing="yes", format="xml")
    assert "packing must be true or false" in str(e.value) and "format must be 'auto' or one of chat" in str(e.value)


def test_packed_logits_match_unpacked(tok, tiny_llama):
    from slimlm.checkpoint.hf import load_hf_folder

    _, model = load_hf_folder(tiny_llama[0])
    records = [
        ({"messages": CHAT[:3]}, "chat"),
        ({"text": "the quick brown fox"}, "text"),
        ({"messages": CHAT}, "chat"),
    ]
    samples = [to_sample(*render(r, f, tok), 64) for r, f in records]
    (row,) = pack(samples, 128)
    batch = collate([row], tok.pad_id)
    with torch.no_grad():
        packed = model(batch["input_ids"], segment_ids=batch["segment_ids"])[0]  # [T, V]
        start = 0
        for s in samples:
            alone = model(torch.tensor([s.input_ids]))[0]
            torch.testing.assert_close(packed[start : start + len(s.input_ids)], alone, atol=1e-4, rtol=1e-4)
            start += len(s.input_ids)
