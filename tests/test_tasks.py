"""tasks/: extract_json is deterministic, its splits are disjoint, its records load as chat, its scorer is strict."""

from __future__ import annotations

import json

import pytest

from slimlm.tasks import TASKS
from slimlm.tasks import extract_json as ej
from slimlm.train.data import read_jsonl


def sentence(example: dict) -> str:
    return example["messages"][0]["content"].split("Sentence: ", 1)[1]


def test_registry():
    assert TASKS["extract_json"] is ej


def test_examples_are_deterministic_and_consistent():
    a, b = ej.make_examples(50, seed=3), ej.make_examples(50, seed=3)
    assert a == b and a != ej.make_examples(50, seed=4)
    assert len({sentence(e) for e in a}) == 50
    for e in a:
        user, assistant = e["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant") and user["content"].startswith(ej.INSTRUCTION)
        assert assistant["content"] == json.dumps(e["fields"]) and list(e["fields"]) == ["name", "age", "city", "job"]
        assert all(str(v) in sentence(e) for v in e["fields"].values()) and 18 <= e["fields"]["age"] <= 80


def test_splits_are_disjoint_and_load_as_chat(tmp_path):
    paths = ej.write_splits(tmp_path, n_train=60, n_val=10, n_test=20, seed=1)
    loaded = {split: read_jsonl(path) for split, path in paths.items()}
    assert {k: len(v) for k, v in loaded.items()} == {"train": 60, "val": 10, "test": 20}
    assert all(fmt == "chat" for records in loaded.values() for _, _, fmt in records)  # "fields" is ignored
    sentences = {split: {sentence(r) for _, r, _ in records} for split, records in loaded.items()}
    assert not (
        sentences["train"] & sentences["val"]
        or sentences["train"] & sentences["test"]
        or sentences["val"] & sentences["test"]
    )
    assert ej.write_splits(tmp_path / "again", 60, 10, 20, seed=1)["test"].read_text() == paths["test"].read_text()


REF = '{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}'


@pytest.mark.parametrize(
    "prediction,expected",
    [
        (REF, True),
        ('  {"age": 34, "name": "Maria Lopez", "job": "nurse", "city": "Lisbon"}\n', True),  # key order, whitespace
        ('{"name":"Maria Lopez","age":34,"city":"Lisbon","job":"nurse"}', True),  # compact separators
        ('{"name": "Maria Lopez", "age": "34", "city": "Lisbon", "job": "nurse"}', False),  # age as a string
        ('{"name": "Maria", "age": 34, "city": "Lisbon", "job": "nurse"}', False),
        ('{"name": "Maria Lopez", "age": 34, "city": "Lisbon"}', False),  # a field missing
        ("```json\n" + REF + "\n```", False),  # fences are not forgiven
        ("Here is the JSON: " + REF, False),
        ("[" + REF + "]", False),
        ("", False),
    ],
)
def test_exact_match(prediction, expected):
    assert ej.exact_match(prediction, REF) is expected


def test_score():
    examples = ej.make_examples(4, seed=0)
    refs = [ej.prompt_and_reference(e)[1] for e in examples]
    assert ej.score(refs, refs) == 1.0 and ej.score(refs[:2] + ["nope", "{}"], refs) == 0.5 and ej.score([], []) == 0.0
    with pytest.raises(ValueError, match="3 predictions for 4 references"):
        ej.score(refs[:3], refs)
