"""Never lose data (issue 15): every command that writes refuses a non-empty --out unless --overwrite, never writes
into its own input (even with --overwrite), and with --overwrite replaces the output with a complete, loadable one.

Found by users: `slimlm merge --adapter X --out X` deleted the adapter it was merging; `slimlm quantize --out DIR`
deleted an unrelated file in DIR. Every command runs in-process through `slimlm.cli.main`; the refusals happen
before any model is loaded, so only the --overwrite cases do real (tiny) work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from slimlm.checkpoint.atomic import atomic_folder, check_output
from slimlm.cli import main

WORDS = "the cat sat on the mat and ran to the big house".split()


# --- shared inputs: one tiny model, one adapter, one data file --------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """A private copy of the tiny model (the tests aim --out at it), a LoRA adapter on it, chat data, a compress
    recipe and a batch input file."""
    from slimlm.checkpoint import load_model
    from slimlm.peft import apply_peft, make_config, save_adapter
    from slimlm.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("no_data_loss")
    model = Path(shutil.copytree(tiny_llama[0], root / "model"))
    _, _, net = load_model(model, torch.float32, "cpu")
    apply_peft(net, "lora", make_config("lora", {"r": 2, "alpha": 4}))
    adapter = save_adapter(net, root / "adapter", base_model=str(model), tokenizer=Tokenizer.from_pretrained(model))
    data = root / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": " ".join(WORDS[i : i + 3])},
                        {"role": "assistant", "content": " ".join(WORDS[i + 3 : i + 6])},
                    ]
                }
            )
            + "\n"
            for i in range(6)
        )
    )
    recipe = root / "compress.yaml"
    recipe.write_text(f"model: {model}\nout: {root / 'compress'}\nstages:\n  - quantize: {{scheme: int8}}\n")
    batch = root / "batch.jsonl"
    batch.write_text(
        json.dumps(
            {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "model", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 2},
            }
        )
        + "\n"
    )
    return {"model": model, "adapter": adapter, "data": data, "recipe": recipe, "batch": batch}


def argv(command: str, i: dict[str, Path], out: Path) -> list[str]:
    """The cheapest command line of `command` writing to `out`."""
    m, o = str(i["model"]), str(out)
    train = ["--train.max_steps", "1", "--train.batch_size", "2", "--dataset.max_seq_len", "64", "-q"]
    return {
        "merge": ["merge", "--model", m, "--adapter", str(i["adapter"]), "--out", o],
        "data task": ["data", "task", "extract_json", "--out", o, "--train", "4", "--val", "1", "--test", "1"],
        "quantize": ["quantize", "--model", m, "--scheme", "int8", "--out", o],
        "prune": ["prune", "--model", m, "--method", "magnitude", "--out", o],
        "fuse": ["fuse", "--model", m, "--passes", "norms", "--out", o],
        "export torchscript": ["export", "torchscript", "--model", m, "--out", o, "--no-check"],
        "export onnx": ["export", "onnx", "--model", m, "--out", o],
        "export tflite": ["export", "tflite", "--model", m, "--out", o],
        "export tensorrt": ["export", "tensorrt", "--onnx", m, "--out", o],
        "compress": ["compress", str(i["recipe"]), "--out", o],
        "finetune": ["finetune", "--model", m, "--method", "lora", "--data", str(i["data"]), "--out", o, *train],
        "distill": ["distill", "--teacher", m, "--student-layers", "1", "--data", str(i["data"]), "--out", o, *train],
        "batch": ["batch", "--model", m, "--quantize", "none", "--dtype", "fp32", "-q", str(i["batch"]), o],
    }[command]


COMMANDS = (
    "merge",
    "data task",
    "quantize",
    "prune",
    "fuse",
    "export torchscript",
    "export onnx",
    "export tflite",
    "export tensorrt",
    "compress",
    "finetune",
    "distill",
    "batch",
)
# What each command reads: the --out aimed at it (or inside it) must be refused even with --overwrite.
INPUT_OF = {"merge": "adapter", "finetune": "data", "distill": "model", "batch": "batch", "data task": None}


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative path: equal snapshots mean byte-identical trees."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(f.relative_to(path)) if f != path else f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files
    }


def refused(capsys, args: list[str], *words: str) -> str:
    """Run the command, expect status 2 and one line on stderr holding every word; returns the line."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


# --- (1) an existing non-empty --out is refused and its files survive -------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_non_empty_out_is_refused_and_kept(command, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    if command == "batch":  # its output is a file
        out = tmp_path / "results.jsonl"
        out.write_text("earlier results\n")
    before = snapshot(out)
    refused(capsys, argv(command, inputs, out), "--overwrite", str(out))
    assert snapshot(out) == before


def test_run_folder_with_checkpoints_names_resume(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    err = refused(capsys, argv("finetune", inputs, out), "--resume", "--overwrite", "step-000001")
    assert "holds checkpoints of an earlier run" in err


# --- (2) an --out that is, is inside or contains an input is refused even with --overwrite ----------------------


def _aimed_at_input(command: str, inputs: dict[str, Path]) -> Path:
    return inputs[INPUT_OF.get(command, "model")]


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
@pytest.mark.parametrize("command", [c for c in COMMANDS if INPUT_OF.get(c, "model")])
def test_out_into_an_input_is_refused_even_with_overwrite(command, where, inputs, capsys):
    target = _aimed_at_input(command, inputs)
    if where == "inside" and target.is_file():
        pytest.skip("nothing is inside a file")
    out = {"is": target, "inside": target / "sub", "contains": target.parent}[where]
    before = snapshot(target)
    refused(capsys, argv(command, inputs, out) + ["--overwrite"], "would write into the input")
    assert snapshot(target) == before
    assert not (target / "sub").exists()


def test_merge_adapter_into_itself_keeps_the_adapter(inputs, capsys):
    """The reported bug, exactly: `merge --adapter X --out X` must not delete X."""
    adapter = inputs["adapter"]
    before = snapshot(adapter)
    for extra in ([], ["--overwrite"]):
        refused(capsys, argv("merge", inputs, adapter) + extra, f"--out {adapter} would write into the input")
    assert snapshot(adapter) == before


def test_out_through_a_symlink_to_the_input_is_refused(inputs, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(inputs["model"], target_is_directory=True)
    before = snapshot(inputs["model"])
    refused(capsys, argv("quantize", inputs, link) + ["--overwrite"], "would write into the input")
    assert snapshot(inputs["model"]) == before


@pytest.mark.parametrize("command", ["quantize", "merge", "finetune"])
def test_a_file_at_out_is_refused(command, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    refused(capsys, argv(command, inputs, out) + ["--overwrite"], "is a file, not a folder")
    assert out.read_text() == "a file"


# --- (3) with --overwrite it succeeds and the result loads -----------------------------------------------------


def _loads_model(out: Path) -> None:
    import slimlm

    llm = slimlm.load(str(out), dtype="fp32")
    assert isinstance(llm.generate("the cat", max_new_tokens=2), str)


CHECKS = {
    "merge": _loads_model,
    "quantize": _loads_model,
    "prune": _loads_model,
    "fuse": _loads_model,
    "data task": lambda out: sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"],
    "export torchscript": lambda out: any(out.glob("*.pt")),
    "finetune": lambda out: (out / "adapter" / "adapter_config.json").is_file(),
    "distill": lambda out: (out / "model" / "config.json").is_file(),
}


@pytest.mark.parametrize("command", list(CHECKS))
def test_overwrite_replaces_and_the_result_loads(command, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(argv(command, inputs, out) + ["--overwrite"]) == 0, capsys.readouterr().err
    assert CHECKS[command](out) is not False
    if command not in ("finetune", "distill"):  # output folders are replaced whole; a run folder is reused
        assert not (out / "notes.txt").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or .old folder left behind


def test_an_empty_out_folder_is_fine(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert main(argv("data task", inputs, out)) == 0
    assert (out / "train.jsonl").is_file()


def test_finetune_resume_still_continues_a_run(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv("finetune", inputs, out) + ["--train.max_steps", "2", "--train.save_every", "1"]) == 0
    refused(capsys, argv("finetune", inputs, out), "--resume", "--overwrite")
    assert main(argv("finetune", inputs, out) + ["--train.max_steps", "2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert main(argv("finetune", inputs, out) + ["--overwrite"]) == 0  # starts over: the old checkpoints go
    assert "resumed from" not in capsys.readouterr().err


def test_batch_overwrite_replaces_the_output_file(inputs, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    out.write_text("earlier results\n")
    assert main(argv("batch", inputs, out) + ["--overwrite"]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text().splitlines()[0])["custom_id"] == "a"


# --- the helpers themselves -------------------------------------------------------------------------------------


def test_check_output_rules(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    assert check_output(tmp_path / "new", overwrite=False, inputs=[src, None, "smollm2-135m"]) == tmp_path / "new"
    with pytest.raises(ValueError, match="would write into the input"):
        check_output(src / "x", overwrite=True, inputs=[src])
    (tmp_path / "f.jsonl").write_text("x")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        check_output(tmp_path / "f.jsonl", overwrite=False, kind="file")
    assert check_output(tmp_path / "f.jsonl", overwrite=True, kind="file")


def test_saved_folders_get_the_usual_mode_not_0700(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "m") as tmp:
            (tmp / "a").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


def test_eval_report_never_lands_in_what_it_measures(inputs, capsys):
    before = snapshot(inputs["model"])
    refused(
        capsys,
        ["eval", "--model", str(inputs["model"]), "--json", str(inputs["model"] / "config.json")],
        "--json",
        "would write into the input",
    )
    assert snapshot(inputs["model"]) == before
