"""train/sources.py and the table path of train/data.py: Parquet / CSV / JSON files, folders, column renames, hub
names (offline only: no test touches the network), and `slimlm finetune` on them with num_epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from slimlm.tokenizer import Tokenizer
from slimlm.train.data import DataConfig, DataError, chat_prompts, load_dataset, read_records, run_data_errors
from slimlm.train.sources import is_hub_name

CHAT = [{"role": "user", "content": "what is Paris?"}, {"role": "assistant", "content": "the capital of France"}]
PAIRS = [("2 + 2", "4"), ("the capital of Italy", "Rome"), ("a zip code", "007")]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_samples(a, b) -> bool:
    return [(s.input_ids, s.labels) for s in a] == [(s.input_ids, s.labels) for s in b]


def test_parquet_with_renamed_columns_equals_the_jsonl(tok, tmp_path):
    reference = write_jsonl(tmp_path / "ref.jsonl", [{"prompt": q, "completion": a} for q, a in PAIRS])
    parquet = tmp_path / "data" / "qa.parquet"
    parquet.parent.mkdir()
    pd.DataFrame({"id": [1, 2, 3], "question": [q for q, _ in PAIRS], "answer": [a for _, a in PAIRS]}).to_parquet(
        parquet
    )
    before = tree(parquet.parent)
    cfg = DataConfig(max_seq_len=64, columns={"prompt": "question", "completion": "answer"})
    samples, stats = load_dataset(parquet, tok, cfg)
    expected, _ = load_dataset(reference, tok, DataConfig(max_seq_len=64))
    assert stats.format == "prompt_completion" and stats.records == 3 and same_samples(samples, expected)
    assert tree(parquet.parent) == before  # nothing written beside the user's data


def test_csv_keeps_text_as_written_and_names_bad_rows(tok, tmp_path):
    path = tmp_path / "qa.csv"
    pd.DataFrame({"prompt": [q for q, _ in PAIRS], "completion": [a for _, a in PAIRS]}).to_csv(path, index=False)
    records = read_records(path, DataConfig())
    assert [r["completion"] for _, r, _ in records] == ["4", "Rome", "007"]  # not 4 (int) or 7
    assert [w for w, _, _ in records] == [f"{path}, row {i}" for i in (1, 2, 3)]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"prompt": ["a", "b", ""], "completion": ["x", "", "z"]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"2 problem\(s\)") as e:
        read_records(bad, DataConfig())
    assert f"{bad}, row 2: field 'completion' is empty" in str(e.value)
    assert f"{bad}, row 3: field 'prompt' is empty" in str(e.value)


def test_chat_messages_from_parquet_and_json(tok, tmp_path):
    rows = [{"messages": CHAT}, {"messages": [{"role": "system", "content": "be brief"}, *CHAT]}]
    reference, _ = load_dataset(write_jsonl(tmp_path / "ref.jsonl", rows), tok, DataConfig(max_seq_len=128))
    pd.DataFrame(rows).to_parquet(tmp_path / "chat.parquet")
    (tmp_path / "chat.json").write_text(json.dumps(rows))  # a JSON array, not JSON lines
    for name in ("chat.parquet", "chat.json"):
        samples, stats = load_dataset(tmp_path / name, tok, DataConfig(max_seq_len=128))
        assert stats.format == "chat" and same_samples(samples, reference), name
    assert chat_prompts(tmp_path / "chat.parquet", DataConfig()) == [
        (CHAT[:1], CHAT[1]["content"]),
        ([{"role": "system", "content": "be brief"}, CHAT[0]], CHAT[1]["content"]),
    ]


def test_a_table_without_known_columns_lists_the_columns_found(tmp_path):
    path = tmp_path / "qa.parquet"
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"no column of a known format \(columns: question, answer\).*dataset\.columns"):
        read_records(path, DataConfig())
    with pytest.raises(DataError, match=r"no column 'query' to rename \(columns: question, answer\)"):
        read_records(path, DataConfig(columns={"prompt": "query", "completion": "answer"}))
    pd.DataFrame({"prompt": ["q"], "text": ["t"]}).to_parquet(path)
    with pytest.raises(DataError, match="columns of formats prompt_completion, text"):
        read_records(path, DataConfig())
    assert [fmt for _, _, fmt in read_records(path, DataConfig(format="text"))] == ["text"]
    with pytest.raises(
        DataError,
        match=r"^.*qa\.parquet: alpaca records need column\(s\) 'instruction', 'output' "
        r"\(columns: prompt, text\); rename one with dataset\.columns",
    ):
        read_records(path, DataConfig(format="alpaca"))
    pd.DataFrame({"prompt": ["q"], "reply": ["a"]}).to_parquet(path)
    with pytest.raises(
        DataError,
        match=r"prompt_completion records need column\(s\) 'completion' \(columns: "
        r"prompt, reply\); rename one with dataset\.columns, e\.g\. completion=",
    ):
        read_records(path, DataConfig())
    with pytest.raises(DataError, match=rf"^{tmp_path / 'missing.csv'} does not exist \(give a file"):
        read_records(tmp_path / "missing.csv", DataConfig())


def test_folder_reads_every_data_file_in_name_order(tok, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "p1", "completion": "c1"}])
    pd.DataFrame({"prompt": ["p2", "p3"], "completion": ["c2", "c3"]}).to_parquet(folder / "b.parquet")
    (folder / "notes.txt").write_text("not data")
    records = read_records(folder, DataConfig())
    assert [r["prompt"] for _, r, _ in records] == ["p1", "p2", "p3"]
    assert records[0][0] == f"{folder / 'a.jsonl'}:1" and records[2][0] == f"{folder / 'b.parquet'}, row 2"
    write_jsonl(folder / "c.jsonl", [{"text": "t"}])
    with pytest.raises(DataError, match=r"c\.jsonl: text records, but .*a\.jsonl:1 is prompt_completion; keep one"):
        read_records(folder, DataConfig())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: the folder holds no \.jsonl, \.parquet, \.csv, \.json file"):
        read_records(empty, DataConfig())


def test_jsonl_keys_are_renamed_and_keep_their_line_errors(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "a", "a": "b"}, {"q": "c"}])
    cfg = DataConfig(columns={"prompt": "q", "completion": "a"})
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'completion'$"):
        read_records(path, cfg)
    write_jsonl(path, [{"q": "a", "a": "b"}])
    assert read_records(path, cfg) == [(f"{path}:1", {"prompt": "a", "completion": "b"}, "prompt_completion")]


def test_hub_names_and_missing_paths(tmp_path, monkeypatch):
    assert is_hub_name("HuggingFaceH4/no_robots") and is_hub_name("imdb")
    assert not is_hub_name(tmp_path / "missing.parquet") and not is_hub_name("./data") and not is_hub_name("a/b/c")
    assert run_data_errors("HuggingFaceH4/no_robots", None, 0, None) == []
    assert run_data_errors(str(tmp_path / "x.parquet"), "nope.csv", 0, None) == [
        f"training data {tmp_path / 'x.parquet'} does not exist (give a file, a folder of data files, or a Hugging "
        "Face dataset name)",
        "eval data nope.csv does not exist (give a file, a folder of data files, or a Hugging Face dataset name)",
    ]
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as without a network, but at once
    with pytest.raises(
        DataError,
        match=r"^someone/no_such_data: not a local file or folder, and the Hugging Face "
        r"Hub cannot be reached \(.*\); connect to the network",
    ) as e:
        read_records("someone/no_such_data", DataConfig())
    assert "\n" not in str(e.value)


def test_data_config_checks_columns_and_splits():
    with pytest.raises(DataError, match="columns: 'question' is not a record key") as e:
        DataConfig(columns={"question": "q", "prompt": "x", "completion": "x"}, split="")
    msg = str(e.value)
    assert "column 'x' is mapped twice" in msg and "split must be a split name" in msg


def test_finetune_on_parquet_for_epochs_logs_tensorboard(tiny_llama, tmp_path, capsys):
    from slimlm.cli import main

    rows = [{"question": f"say {w}", "answer": w} for w in ("one", "two", "three", "four", "five")]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    out = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(tiny_llama[0]),
                "--method",
                "lora",
                "--data",
                str(tmp_path / "train.parquet"),
                "--dataset.columns",
                "prompt=question,completion=answer",
                "--train.num_epochs",
                "2",
                "--train.batch_size",
                "2",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # 3 micro-batches (2, 2, 1) per epoch
    assert [m["epoch"] for m in metrics] == [0.4, 0.8, 1.0, 1.4, 1.8, 2.0]
    assert any((out / "tensorboard").glob("events.out.tfevents.*")) and (out / "adapter").is_dir()


def _help(capsys) -> str:
    from slimlm.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    return capsys.readouterr().out


def test_finetune_help_says_what_data_takes(capsys):
    text = " ".join(_help(capsys).split())
    assert (
        "--data VALUE training data: a .jsonl, .parquet, .csv or .json file, a folder of them, or a Hugging "
        "Face dataset name" in text
    )
    for flag in (
        "--dataset.columns",
        "--dataset.split",
        "--dataset.subset",
        "--train.num_epochs",
        "--train.tensorboard",
    ):
        assert flag in text


def test_distill_on_parquet_for_epochs_caches_every_sample(tiny_llama, tmp_path):
    from slimlm.cli import main

    def chat(n: int) -> list[dict]:
        return [
            {
                "messages": [
                    {"role": "user", "content": f"count to {i}"},
                    {"role": "assistant", "content": " ".join(map(str, range(i)))},
                ]
            }
            for i in range(1, n + 1)
        ]

    pd.DataFrame(chat(5)).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(chat(2)).to_parquet(tmp_path / "val.parquet")
    out = tmp_path / "run"
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(tiny_llama[0]),
                "--student-layers",
                "1",
                "--data",
                str(tmp_path / "train.parquet"),
                "--eval-data",
                str(tmp_path / "val.parquet"),
                "--eval-generate",
                "2",
                "--eval-max-new-tokens",
                "4",
                "--teacher-cache",
                "topk",
                "--top-k",
                "8",
                "--train.num_epochs",
                "2",
                "--train.batch_size",
                "2",
                "--dataset.max_seq_len",
                "64",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["cache"]["built_samples"] == 5  # 2 epochs of 3 steps; all 5 cached
    assert summary["teacher_exact_match"]["n"] == 2  # the generation eval read its prompts from the parquet file


@pytest.mark.slow
def test_demo_task_as_parquet_gives_the_jsonl_samples_with_the_real_tokenizer(tmp_path):
    from slimlm.checkpoint import model_folder
    from slimlm.tasks import extract_json

    source = extract_json.write_splits(tmp_path / "task", n_train=1, n_val=1, n_test=200, seed=0)["test"]
    tok = Tokenizer.from_pretrained(model_folder("smollm2-135m"))
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    pd.DataFrame([{"conversation": r["messages"]} for r in rows]).to_parquet(tmp_path / "test.parquet")
    cfg = DataConfig(max_seq_len=256)
    expected, _ = load_dataset(source, tok, cfg)
    samples, stats = load_dataset(
        tmp_path / "test.parquet", tok, DataConfig(max_seq_len=256, columns={"messages": "conversation"})
    )
    assert stats.records == len(rows) == 200 and same_samples(samples, expected)
