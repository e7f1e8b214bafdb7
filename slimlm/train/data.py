"""SFT data: records -> tokenized `Sample`s with loss masks, optionally packed.

Records come from a JSONL file (read here, line by line), a Parquet / CSV / JSON file, a folder of such files, or a
Hugging Face dataset name (read by train/sources.py through `datasets`); `DataConfig.columns` renames a table's
columns or a JSONL record's keys first. Each record is one object in one of four formats (one format per data
source; extra keys are ignored; a table's format is detected from its column names):
- chat `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`: rendered with the tokenizer's
  own chat template. Loss falls on each assistant turn: its content and the template's end-of-turn token (e.g.
  <|im_end|>), so the tuned model learns to stop. What the template puts after that token (ChatML's newline) is not
  trained: generation stops at the end-of-turn token and never produces it. A turn's span is found by rendering
  prefixes (the conversation before it with the generation prompt, and up to and including it); the prefix renders
  must be token-prefixes of the full render, else DataError.
- alpaca `{"instruction", "input" (optional, may be empty), "output"}`: with a chat template, a user turn
  (instruction, plus "\\n\\n" + input when there is one) and an assistant turn rendered as chat; without one, the
  classic Alpaca prompt + output + EOS, loss on output + EOS.
- prompt/completion `{"prompt", "completion"}`: plain concatenation, no template. The prompt is encoded with the
  tokenizer's special tokens (its BOS, if it uses one), the completion without; loss on completion + EOS (EOS is
  appended unless the completion already ends with it). Parts are tokenized separately so the boundary is exact.
- text `{"text"}`: BOS (if any) + text + EOS, loss on every token.
`train_on_prompt=True` trains every token (the first is never a target: nothing predicts it).

Truncation keeps the first `max_seq_len` tokens; a sample with no trained token left is dropped, and both are
counted in `DataStats`. This module knows nothing about models or the training loop; `batch.collate` pads.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import InputError
from slimlm.jsonl import read_lines
from slimlm.tokenizer import Tokenizer
from slimlm.train import sources
from slimlm.train.batch import IGNORE, Sample

FORMATS = ("chat", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
MAX_LISTED = 50  # a DataError lists at most this many bad lines, then says how many more there are
# The key whose presence identifies each format (a record with two of them is ambiguous).
FORMAT_KEYS = {
    "messages": "chat",
    "instruction": "alpaca",
    "prompt": "prompt_completion",
    "completion": "prompt_completion",
    "text": "text",
}
REQUIRED_COLUMNS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
NO_TEMPLATE = (
    "this tokenizer has no chat template, so chat data cannot be rendered; use the prompt/completion "
    "or text format, or a tokenizer that has one"
)


class DataError(InputError):
    """A data file or data config is invalid; the message lists every problem found and what to do."""


def _raise(header: str, problems: list[str], located: bool = False) -> None:
    """Raise one DataError: `header` and the list of problems, one per line.

    located: each problem already says where it is ("FILE:LINE: ..."), so a single one is raised alone, as one
    line, without the header.
    """
    if located and len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        shown = problems[:MAX_LISTED]
        more = [f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
        raise DataError("\n  ".join([header, *shown, *more]))


@dataclass
class DataConfig:
    max_seq_len: int = 1024  # tokens per sample; longer samples keep their first max_seq_len tokens
    train_on_prompt: bool = False  # False: loss only on assistant/completion tokens
    packing: bool = False  # pack several samples into rows of max_seq_len (no cross-attention between them)
    format: str = "auto"  # "auto" (detected from the keys) or one of FORMATS
    # rename columns/keys to slimlm's record keys, {slimlm key: your column}: YAML {prompt: question, completion:
    # answer}, flag prompt=question,completion=answer
    columns: dict[str, str] = field(default_factory=dict)
    split: str = "train"  # the split of a Hugging Face dataset given as --data ("train[:1000]" slices it)
    eval_split: str = "test"  # the split of a Hugging Face dataset given as --eval-data
    subset: str | None = None  # the subset (config name) of a Hugging Face dataset that has several

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise DataError listing every invalid field."""
        errors = []
        if not isinstance(self.max_seq_len, int) or isinstance(self.max_seq_len, bool) or self.max_seq_len < 2:
            errors.append(f"max_seq_len must be an integer >= 2 (one input and one target), got {self.max_seq_len!r}")
        for name in ("train_on_prompt", "packing"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.format not in ("auto", *FORMATS):
            errors.append(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {self.format!r}")
        errors += sources.check_columns(self.columns)
        for name in ("split", "eval_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                errors.append(f"{name} must be a split name such as 'train', got {getattr(self, name)!r}")
        if self.subset is not None and not isinstance(self.subset, str):
            errors.append(f"subset must be a name, got {self.subset!r}")
        _raise("invalid data config:", errors)


@dataclass
class DataStats:
    records: int  # records read from the file
    samples: int  # records kept (after dropping those with nothing left to train)
    truncated: int  # records longer than max_seq_len, cut to it
    dropped: int  # records with no trained token left after truncation
    tokens: int  # tokens in the kept samples
    trained_tokens: int  # tokens that take a loss
    format: str
    rows: int = 0  # samples handed to the trainer: == samples, or fewer when packed


def run_data_errors(data: str | None, eval_data: str | None, eval_generate: bool, task: str | None) -> list[str]:
    """Problems with a training run's data settings (files exist, generation eval has data, task is bundled)."""
    errors = (
        []
        if data
        else [
            "no training data: pass --data FILE.jsonl (or .parquet, .csv, .json, a folder of "
            "them, or a Hugging Face dataset name)"
        ]
    )
    errors += [
        e for e in (sources.source_error(data, "training data"), sources.source_error(eval_data, "eval data")) if e
    ]
    if eval_generate and not eval_data:
        errors.append("eval_generate needs --eval-data")
    if task is not None:
        from slimlm.tasks import TASKS

        if task not in TASKS:
            errors.append(f"task {task!r} is unknown; bundled tasks: {', '.join(TASKS)}")
    return errors


def detect_format(record: dict) -> str | None:
    """The format whose identifying key the record has, or None when it has none or keys of several formats."""
    found = {fmt for key, fmt in FORMAT_KEYS.items() if key in record}
    return found.pop() if len(found) == 1 else None


def _string_errors(record: dict, keys: tuple[str, ...], empty_ok: tuple[str, ...] = ()) -> list[str]:
    errors = []
    for key in keys:
        value = record.get(key)
        if value is None and key in empty_ok:
            continue
        if value is None:
            errors.append(f"missing field '{key}'")
        elif not isinstance(value, str):
            errors.append(f"field '{key}' must be a string, got {type(value).__name__}")
        elif not value and key not in empty_ok:
            errors.append(f"field '{key}' is empty")
    return errors


def _chat_errors(record: dict) -> list[str]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return ['\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects']
    errors = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            errors.append(f"messages[{i}] must be an object with 'role' and 'content'")
            continue
        if m.get("role") not in ROLES:
            errors.append(f"messages[{i}].role is {m.get('role')!r}; use one of {', '.join(ROLES)}")
        errors += [f"messages[{i}]: {e}" for e in _string_errors(m, ("content",))]
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        errors.append("no assistant turn, so nothing to train on; add one with role 'assistant'")
    elif roles[0] == "assistant":
        errors.append("messages[0] is an assistant turn; start the conversation with a system or user turn")
    return errors


def _record_errors(record: Any, fmt: str) -> list[str]:
    if fmt == "chat":
        return _chat_errors(record)
    if fmt == "alpaca":
        return _string_errors(record, ("instruction", "input", "output"), empty_ok=("input",))
    return _string_errors(record, ("prompt", "completion") if fmt == "prompt_completion" else ("text",))


def _shape_error(record: dict) -> str:
    found = sorted({FORMAT_KEYS[k] for k in record if k in FORMAT_KEYS})
    if found:
        return (
            f"ambiguous record: has keys of formats {', '.join(found)}; "
            "keep one format's keys, or set the format explicitly"
        )
    return (
        f"unknown record shape (keys: {', '.join(sorted(record)) or 'none'}); expected 'messages' (chat), "
        "'instruction'/'output' (alpaca), 'prompt'/'completion', or 'text' (other names: rename them with "
        "dataset.columns, e.g. prompt=question,completion=answer)"
    )


def read_jsonl(
    path: str | Path, format: str = "auto", columns: dict[str, str] | None = None
) -> list[tuple[int, dict, str]]:
    """Read and check a JSONL file: [(line number, record, format)]. Blank lines are skipped.

    `columns` ({slimlm key: your key}) renames each record's keys first. Raises DataError listing every bad line
    as "FILE:LINE: problem; fix", including records whose format differs from the file's first record (one format
    per file).
    """
    if format not in ("auto", *FORMATS):
        raise DataError(f"unknown data format {format!r}; use 'auto' or one of {', '.join(FORMATS)}")
    records, errors = [], []
    for line in read_lines(path):  # blank lines skipped; bad bytes and bad JSON come back as line.error
        n, record = line.number, sources.rename_record(line.value, columns or {})
        if line.error is not None:
            errors.append(f"{path}:{n}: {line.error}")
            continue
        if not isinstance(record, dict):
            errors.append(f"{path}:{n}: a {type(record).__name__}, not a JSON object; each line must be {{...}}")
            continue
        fmt = detect_format(record) if format == "auto" else format
        problems = [_shape_error(record)] if fmt is None else _record_errors(record, fmt)
        errors += [f"{path}:{n}: {p}" for p in problems]
        if not problems:
            records.append((n, record, fmt))
    if records:
        first_line, _, first_fmt = records[0]
        errors += [
            f"{path}:{n}: a {fmt} record, but line {first_line} is {first_fmt}; put one format per file"
            for n, _, fmt in records
            if fmt != first_fmt
        ]
    _raise(f"{path}: {len(errors)} problem(s):", errors, located=True)
    if not records:
        raise DataError(f"{path}: no records; the file is empty (one JSON object per line expected)")
    return records


def table_format(table: sources.Table, format: str = "auto") -> str:
    """A table's format, from its column names (every row has every column, so rows cannot tell formats apart);
    DataError, listing the columns found, when none fits or a required column is missing."""
    columns = f"columns: {', '.join(table.columns) or 'none'}"
    found = sorted({FORMAT_KEYS[c] for c in table.columns if c in FORMAT_KEYS}) if format == "auto" else [format]
    if len(found) != 1:
        what = f"columns of formats {', '.join(found)}" if found else "no column of a known format"
        raise DataError(
            f"{table.name}: {what} ({columns}); expected 'messages' (chat), 'instruction'/'output' "
            "(alpaca), 'prompt'/'completion', or 'text': rename with dataset.columns (e.g. "
            "prompt=question,completion=answer) or set dataset.format"
        )
    missing = [c for c in REQUIRED_COLUMNS[found[0]] if c not in table.columns]
    if missing:
        raise DataError(
            f"{table.name}: {found[0]} records need column(s) {', '.join(map(repr, missing))} "
            f"({columns}); rename one with dataset.columns, e.g. {missing[0]}=YOUR_COLUMN"
        )
    return found[0]


def read_table_records(table: sources.Table, format: str = "auto") -> list[tuple[str, dict, str]]:
    """Check every row of a table: [("NAME, row N", record, format)]; DataError lists every bad row."""
    fmt = table_format(table, format)
    records, errors = [], []
    for i, row in enumerate(table, 1):
        where = f"{table.name}, row {i}"
        problems = _record_errors(row, fmt)
        errors += [f"{where}: {p}" for p in problems]
        if not problems:
            records.append((where, row, fmt))
    _raise(f"{table.name}: {len(errors)} problem(s):", errors, located=True)
    if not records:
        raise DataError(f"{table.name}: no records; the table is empty")
    return records


def read_records(source: str | Path, cfg: DataConfig, split: str | None = None) -> list[tuple[str, dict, str]]:
    """Every checked record of a data source: [(where, record, format)], `where` being "FILE:LINE" (JSONL) or
    "NAME, row N" (tables). A source is a file, a folder of data files (one format across them), or a Hugging Face
    dataset name (`split` defaults to cfg.split). Raises DataError."""
    try:
        if sources.is_hub_name(source):
            table = sources.read_hub(str(source), split or cfg.split, cfg.subset, cfg.columns)
            return read_table_records(table, cfg.format)
        records = []
        for path in sources.data_files(source):
            if sources.is_table_file(path):
                records += read_table_records(sources.read_table(path, cfg.columns), cfg.format)
            else:
                records += [(f"{path}:{n}", r, fmt) for n, r, fmt in read_jsonl(path, cfg.format, cfg.columns)]
            if records[0][2] != records[-1][2]:
                raise DataError(
                    f"{path}: {records[-1][2]} records, but {records[0][0]} is {records[0][2]}; keep "
                    "one format across a folder's files"
                )
    except sources.SourceError as e:
        raise DataError(str(e)) from e
    return records


def _chat_ids(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja templates raise their own errors (e.g. "roles must alternate")
        raise DataError(f"the chat template failed on this conversation: {e}") from e


def render_chat(
    messages: list[dict], tokenizer: Tokenizer, train_on_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Chat template ids and per-token trained flags: each assistant turn's content + end-of-turn token."""
    if not tokenizer.has_chat_template:
        raise DataError(NO_TEMPLATE)
    ids = _chat_ids(tokenizer, messages, False)
    trained = [train_on_prompt] * len(ids)
    if train_on_prompt:
        return ids, trained
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _chat_ids(tokenizer, messages[:i], True)  # ends with the generation prompt
        end = _chat_ids(tokenizer, messages[: i + 1], False)  # ends after this turn
        if end[: len(start)] != start or ids[: len(end)] != end:
            raise DataError(
                f"the chat template renders messages[{i}] differently once later turns follow (its "
                "prefix renders are not token-prefixes of the full render), so assistant turns cannot "
                "be located; use train_on_prompt, or the prompt/completion format"
            )
        # Train up to and including the turn's last stop token; a template without one gets the whole span.
        stops = [j for j in range(len(start), len(end)) if ids[j] in tokenizer.stop_token_ids]
        for j in range(len(start), stops[-1] + 1 if stops else len(end)):
            trained[j] = True
    return ids, trained


def render_prompt_completion(
    prompt: str, completion: str, tokenizer: Tokenizer, train_on_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """BOS (if the tokenizer adds one) + prompt + completion + EOS; flags mark completion + EOS."""
    eos = tokenizer.hf.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set one in tokenizer_config.json so samples can end")
    p = tokenizer.encode(prompt, add_special_tokens=True)
    c = tokenizer.encode(completion, add_special_tokens=False)
    if not c or c[-1] != eos:
        c.append(eos)
    return p + c, [train_on_prompt] * len(p) + [True] * len(c)


def render(record: dict, fmt: str, tokenizer: Tokenizer, train_on_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of one record and per-token trained flags (unshifted: flag j says whether token j is a target)."""
    if fmt == "chat":
        return render_chat(record["messages"], tokenizer, train_on_prompt)
    if fmt == "alpaca":
        instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
        if tokenizer.has_chat_template:
            user = instruction + ("\n\n" + extra if extra else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            return render_chat(messages, tokenizer, train_on_prompt)
        prompt = (ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT).format(instruction=instruction, input=extra)
        return render_prompt_completion(prompt, output, tokenizer, train_on_prompt)
    if fmt == "prompt_completion":
        return render_prompt_completion(record["prompt"], record["completion"], tokenizer, train_on_prompt)
    if fmt == "text":
        return render_prompt_completion("", record["text"], tokenizer, train_on_prompt=True)
    raise DataError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def to_sample(ids: list[int], trained: list[bool], max_seq_len: int) -> Sample | None:
    """Keep the first max_seq_len tokens and shift the flags into labels; None if no trained token is left."""
    ids, trained = ids[:max_seq_len], trained[:max_seq_len]
    # labels[i] = ids[i + 1] when that token is trained; the last position predicts nothing.
    labels = [nxt if t else IGNORE for nxt, t in zip(ids[1:], trained[1:])] + [IGNORE]
    sample = Sample(list(ids), labels)
    return sample if sample.num_trained else None


def pack(samples: list[Sample], max_seq_len: int) -> list[Sample]:
    """Greedily pack samples, in order, into rows of at most max_seq_len tokens; segment_ids 0, 1, 2.. per row.

    A sample is never split across rows. Each sample's last label is IGNORE, so no loss crosses a boundary, and
    the model's segment mask keeps packed samples from attending to each other.
    """
    rows: list[Sample] = []
    ids: list[int] = []
    labels: list[int] = []
    segs: list[int] = []
    for s in samples:
        if len(s.input_ids) > max_seq_len:
            raise ValueError(
                f"a sample of {len(s.input_ids)} tokens exceeds max_seq_len={max_seq_len}; "
                "truncate with to_sample first"
            )
        if ids and len(ids) + len(s.input_ids) > max_seq_len:
            rows.append(Sample(ids, labels, segs))
            ids, labels, segs = [], [], []
        segs += [segs[-1] + 1 if segs else 0] * len(s.input_ids)
        ids += s.input_ids
        labels += s.labels
    if ids:
        rows.append(Sample(ids, labels, segs))
    return rows


def _render_file(
    path: str | Path, tokenizer: Tokenizer, cfg: DataConfig, split: str | None = None
) -> tuple[str, list[tuple[list[int], list[bool]]]]:
    """(format, [(ids, trained)] per record), untruncated; every rendering error is collected into one DataError."""
    cfg.validate()
    records = read_records(path, cfg, split)
    fmt = records[0][2]
    if fmt == "chat" and not tokenizer.has_chat_template:
        raise DataError(f"{path}: {NO_TEMPLATE}")
    rendered, errors = [], []
    for where, record, _ in records:
        try:
            rendered.append(render(record, fmt, tokenizer, cfg.train_on_prompt))
        except DataError as e:
            errors.append(f"{where}: {e}")
    _raise(f"{path}: {len(errors)} record(s) could not be rendered:", errors, located=True)
    return fmt, rendered


def _samples(fmt: str, rendered: list, cfg: DataConfig) -> tuple[list[Sample], DataStats]:
    samples = [s for ids, trained in rendered if (s := to_sample(ids, trained, cfg.max_seq_len)) is not None]
    stats = DataStats(
        records=len(rendered),
        samples=len(samples),
        dropped=len(rendered) - len(samples),
        truncated=sum(len(ids) > cfg.max_seq_len for ids, _ in rendered),
        tokens=sum(len(s.input_ids) for s in samples),
        trained_tokens=sum(s.num_trained for s in samples),
        format=fmt,
    )
    rows = pack(samples, cfg.max_seq_len) if cfg.packing else samples
    stats.rows = len(rows)
    return rows, stats


def load_dataset(
    path: str | Path, tokenizer: Tokenizer, cfg: DataConfig, split: str | None = None
) -> tuple[list[Sample], DataStats]:
    """Read, render, truncate (and pack) a data source (see `read_records`); warns when records were dropped.

    `split`: the split of a Hugging Face dataset (default cfg.split; local files are read whole)."""
    fmt, rendered = _render_file(path, tokenizer, cfg, split)
    samples, stats = _samples(fmt, rendered, cfg)
    if stats.dropped:
        warnings.warn(
            f"{path}: dropped {stats.dropped} of {stats.records} records with no trained token within "
            f"max_seq_len={cfg.max_seq_len}; raise max_seq_len or shorten the prompts",
            stacklevel=2,
        )
    if not samples:
        raise DataError(f"{path}: no sample has a trained token within max_seq_len={cfg.max_seq_len}; raise it")
    return samples, stats


def mark_trained(tokenizer: Tokenizer, ids: list[int], trained: list[bool], color: bool = False) -> str:
    """Decode ids with trained runs wrapped in [[ ]] (or shown in green with color=True); special tokens kept."""
    opened, closed = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    parts, start = [], 0
    for j in range(1, len(ids) + 1):  # cut at each change of flag, decode each run
        if j == len(ids) or trained[j] != trained[start]:
            text = tokenizer.decode(ids[start:j], skip_special_tokens=False)
            parts.append(opened + text + closed if trained[start] else text)
            start = j
    return "".join(parts)


def chat_prompts(source: str | Path, cfg: DataConfig, split: str | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) of every chat record whose last turn is the assistant's, from any source
    (generation eval); [] for sources of other formats."""
    out = []
    for _, record, fmt in read_records(source, cfg, split):
        msgs = record["messages"] if fmt == "chat" else None
        if msgs and msgs[-1]["role"] == "assistant":
            out.append(([dict(m) for m in msgs[:-1]], msgs[-1]["content"]))
    return out


def check_file(path: str | Path, tokenizer: Tokenizer, cfg: DataConfig, color: bool = False) -> str:
    """Validate a data file (raises DataError) and return a report: counts, lengths, truncation, one marked sample."""
    fmt, rendered = _render_file(path, tokenizer, cfg)
    _, stats = _samples(fmt, rendered, cfg)
    lengths = [len(ids) for ids, _ in rendered]
    trained_pct = 100 * stats.trained_tokens / max(stats.tokens, 1)
    lines = [
        f"{path}: {stats.records} records, format {fmt}",
        f"tokens per record: min {min(lengths)}, median {statistics.median(lengths):g}, max {max(lengths)}",
        f"max_seq_len {cfg.max_seq_len}: {stats.truncated} truncated, {stats.dropped} dropped (no trained token)",
        f"{stats.samples} samples, {stats.tokens} tokens, {stats.trained_tokens} trained ({trained_pct:.1f}%)",
    ]
    if cfg.packing:
        lines.append(f"packed into {stats.rows} rows of at most {cfg.max_seq_len} tokens")
    for ids, trained in rendered:  # the first record that survives truncation, as the model sees it
        ids, trained = ids[: cfg.max_seq_len], [False] + trained[1 : cfg.max_seq_len]  # token 0 is never a target
        if any(trained):
            how = "in green" if color else "in [[ ]]"
            lines += ["", f"first sample, trained tokens {how}:", mark_trained(tokenizer, ids, trained, color)]
            break
    return "\n".join(lines)
