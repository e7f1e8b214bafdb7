"""extract_json: pull a person's name, age, city and job out of one sentence into compact JSON.

A toy instruction task that the base SmolLM2-135M-Instruct gets wrong (extra prose, other keys, quoted ages,
fences) and a few minutes of LoRA training fixes. Examples are generated deterministically from
`random.Random(seed)` as chat records; the answer is `json.dumps` of {"name", "age", "city", "job"} in that order.
Scoring is exact match after parsing: the whole stripped prediction must be one JSON object equal to the reference.
This module is data only; it knows nothing about models or generation.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

INSTRUCTION = "Extract the person's name, age, city and job from the sentence as JSON."

# Different field orders and phrasings, so the model must read the sentence rather than count words.
TEMPLATES = (
    "{name}, {a_age}-year-old {job}, lives in {city}.",
    "{name} is {a_job} from {city} who is {age} years old.",
    "At {age}, {name} works as {a_job} in {city}.",
    "{name} ({age}) works as {a_job} in {city}.",
    "In {city}, {age}-year-old {name} earns a living as {a_job}.",
    "Meet {name}: {a_job}, {age} years old, based in {city}.",
    "The {job} {name}, aged {age}, lives in {city}.",
    "{city} is home to {name}, {a_job} who just turned {age}.",
    "{name} turned {age} this spring and still works as {a_job} in {city}.",
    "Our new neighbor in {city} is {name}, {age}, who works as {a_job}.",
)
FIRST_NAMES = (
    "Maria Ahmed James Yuki Olga Kwame Sofia Liam Priya Mateo Chen Amara Lukas Fatima Noah Ingrid Diego "
    "Hana Omar Elena Tariq Chloe Ravi Zara Felix Aisha Bruno Mei Jonas Leila Pablo Anya Samuel Nadia "
    "Hugo Keiko Viktor Grace Tomas Imani"
).split()
LAST_NAMES = (
    "Lopez Khan Smith Tanaka Petrova Mensah Rossi Murphy Sharma Garcia Wang Okafor Becker Haddad Cohen "
    "Larsen Silva Kim Nasser Popescu Dubois Patel Novak Jensen Moreau Costa Nguyen Schmidt Ali Kowalski "
    "Fischer Reyes Ivanova Brown Sato Mendes Andersen Kaya Dumont Walker"
).split()
CITIES = (
    "Lisbon",
    "Nairobi",
    "Toronto",
    "Osaka",
    "Berlin",
    "Lima",
    "Oslo",
    "Cairo",
    "Dublin",
    "Seoul",
    "Madrid",
    "Accra",
    "Vienna",
    "Mumbai",
    "Denver",
    "Prague",
    "Santiago",
    "Helsinki",
    "Hanoi",
    "Melbourne",
    "Bogota",
    "Warsaw",
    "Istanbul",
    "Montreal",
    "Lyon",
    "Porto",
    "Kyoto",
    "Chicago",
    "Athens",
    "Manila",
    "Zurich",
    "Dakar",
    "Auckland",
    "Glasgow",
    "Havana",
    "Budapest",
    "Tunis",
    "Seattle",
    "New York",
    "Buenos Aires",
)
JOBS = (
    "nurse",
    "teacher",
    "engineer",
    "architect",
    "baker",
    "carpenter",
    "chef",
    "dentist",
    "electrician",
    "farmer",
    "firefighter",
    "journalist",
    "lawyer",
    "librarian",
    "mechanic",
    "musician",
    "painter",
    "pharmacist",
    "photographer",
    "pilot",
    "plumber",
    "police officer",
    "programmer",
    "accountant",
    "scientist",
    "translator",
    "veterinarian",
    "waiter",
    "economist",
    "designer",
)
AGES = (18, 80)


def _example(rng: random.Random) -> dict:
    """One chat record with its fields as metadata; the draw order is fixed, so a seed fixes the dataset."""
    fields = {
        "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "age": rng.randint(*AGES),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }
    a_job = ("an " if fields["job"][0] in "aeiou" else "a ") + fields["job"]
    a_age = ("an " if fields["age"] in (18, 80) else "a ") + str(fields["age"])  # "an 18-year-old"
    sentence = rng.choice(TEMPLATES).format(**fields, a_job=a_job, a_age=a_age)
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n\nSentence: {sentence}"},
            {"role": "assistant", "content": json.dumps(fields)},
        ],
        "fields": fields,
    }


def make_examples(n: int, seed: int) -> list[dict]:
    """n examples with distinct sentences, each {"messages": [user, assistant], "fields": {...}}."""
    rng, seen, examples = random.Random(seed), set(), []
    while len(examples) < n:
        ex = _example(rng)
        if ex["messages"][0]["content"] not in seen:  # about 1e9 combinations: repeats are rare but possible
            seen.add(ex["messages"][0]["content"])
            examples.append(ex)
    return examples


def write_splits(
    folder: str | Path, n_train: int = 2000, n_val: int = 100, n_test: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Write train/val/test.jsonl into folder; the splits are slices of one de-duplicated draw, so disjoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = make_examples(n_train + n_val + n_test, seed)
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, n_train + n_val + n_test),
    }
    paths = {}
    for split, (lo, hi) in bounds.items():
        paths[split] = folder / f"{split}.jsonl"
        tmp = folder / f".{split}.jsonl.tmp-{os.getpid()}"  # renamed into place: a kill never leaves half a split
        tmp.write_text("".join(json.dumps(ex) + "\n" for ex in examples[lo:hi]), encoding="utf-8")
        os.replace(tmp, paths[split])
    return paths


def prompt_and_reference(example: dict) -> tuple[list[dict], str]:
    """The messages to prompt with (the user turn) and the reference answer of one example."""
    user, assistant = example["messages"]
    return [user], assistant["content"]


def exact_match(prediction: str, reference: str) -> bool:
    """True when the stripped prediction parses as a JSON object equal to the reference (key order aside).

    Nothing else is forgiven: prose around the JSON, ``` fences, or "34" for 34 all count as wrong.
    """
    try:
        pred = json.loads(prediction.strip())
    except (json.JSONDecodeError, ValueError):
        return False
    return isinstance(pred, dict) and pred == json.loads(reference)


def score(predictions: list[str], references: list[str]) -> float:
    """Fraction of exact matches (0.0 for no examples)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; pass one per reference")
    return sum(map(exact_match, predictions, references)) / len(references) if references else 0.0
