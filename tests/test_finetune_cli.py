"""The fine-tuning command line end to end on the tiny Llama: recipes and flags (recipe.py), `slimlm data`,
`slimlm finetune` for every method, invalid configs, `generate --adapter`, `merge`, `info` on an adapter, resume.

Every command runs in-process through `slimlm.cli.main([...])`; runs are a few optimizer steps on a dozen short
chat records, so the whole file takes seconds.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimlm.cli import build_parser, main
from slimlm.recipe import RecipeError, apply_flags, from_dict, load_recipe, to_dict
from slimlm.train.data import DataConfig
from slimlm.train.finetune import FinetuneConfig
from slimlm.train.trainer import TrainConfig

METHODS = ("lora", "qlora", "adapter", "bitfit", "prefix", "prompt", "full")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SHORT = ["the", "cat", "sat", "on", "the", "mat", "and", "ran", "to", "the", "big", "house"]


# --- shared data and runs ----------------------------------------------------------------------------------------


def _chat_records(n: int, seed: int) -> list[dict]:
    """Short chat records in words the tiny tokenizer knows: nothing is truncated at max_seq_len 128."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        msgs += [
            {"role": "user", "content": " ".join(rng.choices(SHORT, k=rng.randint(2, 6)))},
            {"role": "assistant", "content": " ".join(rng.choices(SHORT, k=rng.randint(2, 8)))},
        ]
        recs.append({"messages": msgs})
    return recs


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chat_data")
    return (
        _write_jsonl(folder / "train.jsonl", _chat_records(12, seed=0)),
        _write_jsonl(folder / "val.jsonl", _chat_records(4, seed=1)),
    )


def _finetune_argv(model: Path, method: str, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--model",
        str(model),
        "--method",
        method,
        "--data",
        str(data[0]),
        "--eval-data",
        str(data[1]),
        "--out",
        str(out),
        "--train.max_steps",
        "3",
        "--train.batch_size",
        "2",
        "--dataset.max_seq_len",
        "128",
        "-q",
        *extra,
    ]


@pytest.fixture(scope="module")
def finetuned(tiny_llama, chat_data, tmp_path_factory):
    """finetuned(method) -> OUT of a 3-step run on the tiny Llama; each method trains once per module."""
    root, runs = tmp_path_factory.mktemp("runs"), {}

    def get(method: str) -> Path:
        if method not in runs:
            out = root / method
            assert main(_finetune_argv(tiny_llama[0], method, chat_data, out)) == 0
            runs[method] = out
        return runs[method]

    return get


def _probe_ids(folder: Path) -> torch.Tensor:
    from slimlm.tokenizer import Tokenizer

    return torch.tensor([Tokenizer.from_pretrained(folder).encode("the quick brown fox jumps over the lazy dog")])


@torch.no_grad()
def _slimlm_logits(model_folder: Path, ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    from slimlm.checkpoint import load_model
    from slimlm.peft import load_adapter
    from slimlm.tokenizer import Tokenizer

    net = load_model(model_folder)[2]
    if adapter is not None:
        load_adapter(net, adapter, Tokenizer.from_pretrained(model_folder))
    return net(ids).float()


@torch.no_grad()
def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    return model.eval()(ids).logits.float()


# --- recipe.py ---------------------------------------------------------------------------------------------------


def test_from_dict_nested_sections_and_defaults():
    cfg = from_dict(
        FinetuneConfig,
        {
            "method": "qlora",
            "data": "d.jsonl",
            "train": {"lr": 1e-3, "betas": [0.8, 0.99], "max_steps": 7},
            "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "dataset": {"packing": True},
            "prompt": None,
        },
    )
    assert cfg.method == "qlora" and cfg.data == "d.jsonl"
    assert cfg.train.lr == 1e-3 and cfg.train.betas == (0.8, 0.99) and cfg.train.max_steps == 7
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched keys keep their defaults
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.alpha == 32.0
    assert cfg.dataset == DataConfig(packing=True)
    assert cfg.prompt == FinetuneConfig().prompt  # an empty section is the defaults
    assert cfg.method_config() is cfg.lora  # qlora reads the lora section


def test_unknown_keys_are_named_with_the_valid_ones(tmp_path):
    with pytest.raises(RecipeError) as e:
        from_dict(FinetuneConfig, {"modle": "x", "method": "lora"})
    assert "['modle']" in str(e.value) and "valid keys: model, base_name, method, data, eval_data" in str(e.value)
    with pytest.raises(RecipeError) as e:
        from_dict(FinetuneConfig, {"train": {"lr": 1e-3, "lrr": 1, "maxsteps": 2}})
    msg = str(e.value)
    assert "train." in msg and "['lrr', 'maxsteps']" in msg and "max_steps" in msg and "warmup_steps" in msg
    with pytest.raises(RecipeError, match=r"lora\.: unknown key\(s\) \['rank'\]; valid keys: r, alpha"):
        from_dict(FinetuneConfig, {"lora": {"rank": 8}})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nadapter:\n  bottleneck: 8\n  width: 3\n")
    expected = f"{recipe}: adapter.: unknown key(s) ['width']; valid keys: style"
    with pytest.raises(RecipeError, match=re.escape(expected)):
        load_recipe(FinetuneConfig, recipe)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"train": {"max_steps": "many"}}, r"train\.max_steps: 'many' is not a valid int"),
        ({"train": {"max_steps": 2.5}}, r"train\.max_steps: 2\.5 is not a valid int"),  # no silent truncation
        ({"train": {"lr": True}}, r"train\.lr: True is not a valid float"),
        ({"train": {"lr": "fast"}}, r"train\.lr: 'fast' is not a valid float"),
        ({"resume": "maybe"}, r"resume: 'maybe' is not a valid bool"),
        ({"train": {"betas": 0.9}}, r"train\.betas: 0\.9 is not a valid tuple"),
        ({"train": "fast"}, r"train\.: expected a mapping, got str"),
        (["lora"], r"recipe: expected a mapping, got list"),
    ],
)
def test_type_coercion_errors(values, match):
    with pytest.raises(RecipeError, match=match):
        from_dict(FinetuneConfig, values)


def test_yaml_values_are_coerced(tmp_path):
    recipe = tmp_path / "r.yaml"
    # PyYAML reads 1e-4 (no dot) as a string and yes/no as booleans; numbers given for strings become strings
    recipe.write_text(
        "model: 123\nresume: yes\nnf4_base: 'false'\ntrain:\n  lr: 1e-4\n  max_steps: 4.0\n  betas: [0.5, 0.9]\n"
    )
    cfg = load_recipe(FinetuneConfig, recipe)
    assert cfg.model == "123" and cfg.resume is True and cfg.nf4_base is False
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 4 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.betas == (0.5, 0.9)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(FinetuneConfig, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(FinetuneConfig, tmp_path / "bad.yaml")


def _flags(*argv: str):
    return build_parser().parse_args(["finetune", *argv])


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: base\ndata: t.jsonl\neval_data: a.jsonl\nnf4_base: true\nresume: false\n"
        "train:\n  lr: 1.0e-3\n  max_steps: 7\nlora:\n  r: 4\n  alpha: 8\n"
    )
    args = _flags(
        str(recipe),
        "--train.lr",
        "5e-4",
        "--lora.r",
        "8",
        "--eval-data",
        "v.jsonl",
        "--nf4-base",
        "false",
        "--train.betas",
        "0.8,0.95",
        "--lora.target_modules",
        "q_proj,v_proj",
        "--dataset.packing",
        "--resume",
    )
    assert args.recipe == str(recipe)
    cfg = apply_flags(load_recipe(FinetuneConfig, args.recipe), args)
    assert cfg.train.lr == 5e-4 and cfg.lora.r == 8 and cfg.eval_data == "v.jsonl"
    assert cfg.nf4_base is False and cfg.resume is True and cfg.dataset.packing is True  # bare --flag = true
    assert cfg.train.betas == (0.8, 0.95) and cfg.lora.target_modules == "q_proj,v_proj"
    # what no flag names comes from the recipe, then from the defaults
    assert cfg.model == "base" and cfg.data == "t.jsonl" and cfg.train.max_steps == 7 and cfg.lora.alpha == 8.0
    assert cfg.train.batch_size == TrainConfig().batch_size and cfg.method == "lora"
    # no flags at all: the recipe unchanged
    assert apply_flags(load_recipe(FinetuneConfig, recipe), _flags(str(recipe))) == load_recipe(FinetuneConfig, recipe)
    assert apply_flags(FinetuneConfig(), _flags("--nf4-base")).nf4_base is True
    # "none" un-sets an optional field the recipe set, so a step-based recipe can run by epochs
    cfg = apply_flags(
        load_recipe(FinetuneConfig, recipe), _flags(str(recipe), "--train.max_steps", "none", "--train.num_epochs", "2")
    )
    assert cfg.train.max_steps is None and cfg.train.num_epochs == 2


def test_every_field_has_a_flag():
    args = vars(_flags())
    cfg = to_dict(FinetuneConfig())
    expected = {k for k, v in cfg.items() if not isinstance(v, dict)}
    expected |= {f"{k}.{sub}" for k, v in cfg.items() if isinstance(v, dict) for sub in v}
    assert expected <= set(args) and all(args[k] is None for k in expected)  # None: only given flags override


def _finetune_parser():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["finetune"]


def test_every_generated_flag_has_help_from_its_field_comment(capsys):
    """Help comes from the comment after each dataclass field (recipe.field_docs), defaults appended."""
    from slimlm.peft import PEFT_METHODS

    undocumented = [
        a.option_strings[0]
        for a in _finetune_parser()._actions
        if a.option_strings and (a.help or "").startswith("(default")
    ]
    assert undocumented == []
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert e.value.code == 0
    for text in (
        "--train.lr X peak learning rate (AdamW) (default: 0.0002)",
        "--lora.r N rank of the update",
        "--data VALUE training data: a .jsonl, .parquet, .csv or .json file, a folder of them, or a Hugging "
        "Face dataset name",
        "--bitfit.targets VALUE Projections that get a trainable bias",  # a comment above the field
        'chat {"messages":',
        "slimlm data check FILE",
        "options --lora.*",
    ):
        assert text in out, text
    methods = out.split("methods (--method):")[1]
    assert all(f" {name} " in methods for name in PEFT_METHODS)


def test_version(capsys):
    from importlib.metadata import version

    import slimlm

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"slimlm {version('slimlm')}\n"
    assert version("slimlm") == slimlm.__version__  # pyproject.toml and the package agree


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["finetune", "--lr", "1e-4"], " (did you mean --train.lr?)"),
        (["finetune", "--metod", "lora"], " (did you mean --method"),
        (["export", "onnx", "--out", "x", "--bogus"], ""),
    ],
)
def test_unknown_flag_prints_the_subcommands_usage(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    command = " ".join(a for a in argv[:2] if not a.startswith("-"))
    assert e.value.code == 2 and f"usage: slimlm {command} [-h]" in err
    bad = next(a for a in argv if a in ("--lr", "--metod", "--bogus"))
    assert f"slimlm {command}: error: unrecognized arguments: {bad}" in err and hint in err


def test_to_dict_round_trip(tmp_path):
    import yaml

    cfg = FinetuneConfig(
        model="m",
        method="prefix",
        data="t.jsonl",
        eval_data="v.jsonl",
        resume=True,
        train=TrainConfig(max_steps=5, lr=3e-4, betas=(0.7, 0.9), precision="bf16"),
        dataset=DataConfig(max_seq_len=64, packing=True),
    )
    cfg.lora.target_modules = ["q_proj", "o_proj"]
    cfg.prefix.encoder_hidden_size = 32
    d = to_dict(cfg)
    assert list(d) == [f for f in FinetuneConfig.__dataclass_fields__]
    assert d["train"]["max_steps"] == 5 and d["prefix"]["encoder_hidden_size"] == 32
    assert from_dict(FinetuneConfig, d) == cfg
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    assert load_recipe(FinetuneConfig, tmp_path / "r.yaml") == cfg


# --- slimlm data -------------------------------------------------------------------------------------------------


def test_data_task_writes_three_splits(tmp_path, capsys):
    out = tmp_path / "task"
    assert main(["data", "task", "extract_json", "--out", str(out), "--train", "40", "--val", "8", "--test", "8"]) == 0
    printed = capsys.readouterr().out.split("\n")
    sizes = {"train": 40, "val": 8, "test": 8}
    for split, n in sizes.items():
        path = out / f"{split}.jsonl"
        assert any(line.split() == [split, str(path)] for line in printed)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == n
        assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    contents = [(out / f"{s}.jsonl").read_text().splitlines() for s in sizes]
    assert len(set().union(*contents)) == 56  # the splits are disjoint
    assert main(["data", "task", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'nope'; bundled tasks: extract_json" in capsys.readouterr().err


def test_data_check_prints_report_with_marked_sample(tiny_llama, tmp_path, capsys):
    from slimlm.tasks import TASKS

    paths = TASKS["extract_json"].write_splits(tmp_path, n_train=10, n_val=0, n_test=0)
    assert main(["data", "check", str(paths["train"]), "--model", str(tiny_llama[0]), "--max-seq-len", "512"]) == 0
    report = capsys.readouterr().out
    assert f"{paths['train']}: 10 records, format chat" in report
    assert "max_seq_len 512: 0 truncated, 0 dropped" in report
    assert "first sample, trained tokens in [[ ]]:" in report
    first = json.loads(paths["train"].read_text().splitlines()[0])["messages"]
    # the assistant's answer and its end-of-turn token are trained, the user turn is not
    assert f"<|im_start|>assistant\n[[{first[1]['content']}<|im_end|>]]" in report
    sample = report.split("trained tokens in [[ ]]:\n")[1]
    assert sample.count("[[") == 1 and sample.startswith(f"<|im_start|>user\n{first[0]['content']}<|im_end|>")
    # truncated: the report says so and marks only what is left
    assert main(["data", "check", str(paths["train"]), "--model", str(tiny_llama[0]), "--max-seq-len", "64"]) == 0
    assert "max_seq_len 64: 10 truncated, 10 dropped" in capsys.readouterr().out


def test_data_check_broken_file_names_the_lines(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"\n'
        '{"messages": [{"role": "user", "content": "hello"}]}\n'
    )
    assert main(["data", "check", str(bad), "--model", str(tiny_llama[0])]) == 2
    err = capsys.readouterr()
    assert err.out == ""
    assert f"{bad}:2: invalid JSON" in err.err and f"{bad}:3: no assistant turn" in err.err
    assert f"{bad}:1" not in err.err
    assert main(["data", "check", str(tmp_path / "missing.jsonl"), "--model", str(tiny_llama[0])]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["data", "check", str(bad), "--model", str(tiny_llama[0]), "--format", "csv"]) == 2
    assert "format must be 'auto' or one of" in capsys.readouterr().err


# --- slimlm finetune, every method -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_finetune_writes_outputs_and_recipe_round_trips(method, tiny_llama, chat_data, finetuned, tmp_path, capsys):
    from slimlm.peft.common import read_adapter_metadata

    out = finetuned(method)
    stdout = capsys.readouterr().out
    assert "done: 3 steps" in stdout and f"{method}: trainable params" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 3 and summary["eval"]["eval_loss"] > 0
    assert summary["data"]["records"] == 12 and summary["data"]["dropped"] == 0
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert (summary["trainable_params"] == summary["total_params"]) == (method == "full")
    assert (out / "training.png").read_bytes().startswith(b"\x89PNG")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3] and "eval_loss" in lines[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines if "loss" in r)
    recipe = load_recipe(FinetuneConfig, out / "recipe.yaml")
    assert recipe.method == method and recipe.model == str(tiny_llama[0]) and recipe.out == str(out)
    assert recipe.train.max_steps == 3 and recipe.train.batch_size == 2 and recipe.dataset.max_seq_len == 128
    assert recipe.eval_data == str(chat_data[1])
    if method == "full":
        assert summary["output"] == str(out / "model") and not (out / "adapter").exists()
        ids = _probe_ids(tiny_llama[0])
        hf = _hf_logits(out / "model", ids)
        assert (hf - _slimlm_logits(out / "model", ids)).abs().max() < 1e-4
        assert (hf - _slimlm_logits(tiny_llama[0], ids)).abs().max() > 1e-3  # it trained
        assert all((out / "model" / f).is_file() for f in TOKENIZER_FILES)
    else:
        adapter = out / "adapter"
        assert summary["output"] == str(adapter) and not (out / "model").exists()
        for f in ("adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES):
            assert (adapter / f).is_file(), f
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tiny_llama[0])
        assert len(load_file(adapter / "adapter_model.safetensors")) > 0
        meta = read_adapter_metadata(adapter)
        assert meta["slimlm_method"] == method and meta["slimlm_nf4_base"] == str(method == "qlora").lower()

    # the written recipe runs again as it is, with flags on top
    out2 = tmp_path / "again"
    assert main(["finetune", str(out / "recipe.yaml"), "--out", str(out2), "--train.max_steps", "2", "-q"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    again = load_recipe(FinetuneConfig, out2 / "recipe.yaml")
    assert json.loads((out2 / "summary.json").read_text())["steps"] == 2
    assert (out2 / ("model" if method == "full" else "adapter")).is_dir()
    recipe.out, recipe.train.max_steps = str(out2), 2
    assert again == recipe


def test_finetune_with_generation_eval(tiny_llama, chat_data, tmp_path, capsys):
    """--eval-generate scores greedy answers to the eval prompts (here with the extract_json task's scorer; the
    task's own prompts are longer than the tiny model's 128-token context)."""
    out = tmp_path / "run"
    argv = _finetune_argv(
        tiny_llama[0],
        "lora",
        chat_data,
        out,
        "--task",
        "extract_json",
        "--eval-generate",
        "2",
        "--eval-max-new-tokens",
        "4",
        "--train.max_steps",
        "1",
        "--lora.r",
        "2",
        "--base-name",
        "org/tiny-base",
    )
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["n"] == 2 and summary["eval"]["exact_match"] == 0.0 and summary["eval"]["eval_loss"] > 0
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 2 and adapter_config["base_model_name_or_path"] == "org/tiny-base"
    assert "exact_match" in capsys.readouterr().out
    assert load_recipe(FinetuneConfig, out / "recipe.yaml").task == "extract_json"


def test_adapter_init_follows_train_seed(tiny_llama, chat_data, tmp_path):
    """train.seed fixes the run, the adapter's random init included, whatever the global RNG was before."""

    def adapter_after(seed_before: int, out: Path, *extra: str) -> dict:
        torch.manual_seed(seed_before)
        assert main(_finetune_argv(tiny_llama[0], "lora", chat_data, out, "--train.max_steps", "1", *extra)) == 0
        return load_file(out / "adapter" / "adapter_model.safetensors")

    a, b = adapter_after(1, tmp_path / "a"), adapter_after(2, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = adapter_after(1, tmp_path / "c", "--train.seed", "5")
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- invalid configs ---------------------------------------------------------------------------------------------


def _fails(capsys, *argv: str) -> str:
    assert main(["finetune", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_invalid_config_names_every_problem(tiny_llama, chat_data, tmp_path, capsys):
    m, data, out = str(tiny_llama[0]), str(chat_data[0]), tmp_path / "out"
    err = _fails(
        capsys,
        "--model",
        m,
        "--method",
        "lora",
        "--data",
        str(tmp_path / "missing.jsonl"),
        "--eval-data",
        str(tmp_path / "nope.jsonl"),
        "--out",
        str(out),
        "--lora.r",
        "0",
        "--lora.dropout",
        "1.5",
        "--train.max_steps",
        "0",
        "--dtype",
        "fp16",
        "--eval-generate",
        "2",
        "--task",
        "riddles",
    )
    assert err.startswith("slimlm finetune: error: invalid fine-tuning config:")
    for problem in (
        f"training data {tmp_path / 'missing.jsonl'} does not exist",
        f"eval data {tmp_path / 'nope.jsonl'} does not exist",
        "lora r must be >= 1, got 0",
        "lora dropout must be in [0, 1), got 1.5",
        "max_steps must be a positive integer, got 0",
        "dtype must be fp32 or bf16, got 'fp16'",
        "task 'riddles' is unknown",
    ):
        assert problem in err, problem
    assert not out.exists()  # nothing is loaded or written before the config is valid

    err = _fails(capsys, "--model", m, "--method", "dpo", "--out", str(out))
    assert "method 'dpo' is unknown; choose from full, lora, qlora, adapter, bitfit, prefix, prompt" in err
    assert "no training data: pass --data FILE.jsonl" in err
    err = _fails(capsys, "--model", m, "--method", "full", "--nf4-base", "--data", data, "--out", str(out))
    assert "full fine-tuning cannot use an NF4 base" in err
    err = _fails(capsys, "--model", m, "--data", data, "--eval-generate", "3", "--out", str(out))
    assert "eval_generate needs --eval-data" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--train.lr", "abc", "train.lr: 'abc' is not a valid float"),
        ("--train.max_steps", "2.5", "train.max_steps: '2.5' is not a valid int"),
        ("--lora.r", "eight", "lora.r: 'eight' is not a valid int"),
        ("--resume", "maybe", "resume: 'maybe' is not a valid bool"),
        ("--dataset.max_seq_len", "1", "max_seq_len must be an integer >= 2"),
    ],
)
def test_bad_flag_values_exit_2(flag, value, match, tiny_llama, chat_data, tmp_path, capsys):
    err = _fails(
        capsys, "--model", str(tiny_llama[0]), "--data", str(chat_data[0]), "--out", str(tmp_path / "o"), flag, value
    )
    assert err.startswith("slimlm finetune: error:") and match in err
    assert not (tmp_path / "o").exists()


def test_bad_recipe_exits_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\ntrian:\n  lr: 1.0e-3\n")
    err = _fails(capsys, str(recipe))
    assert "unknown key(s) ['trian']" in err and "valid keys:" in err and "train" in err
    assert "does not exist" in _fails(capsys, str(tmp_path / "none.yaml"))


# --- generate --adapter ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_generate_with_adapter(method, tiny_llama, finetuned, capsys):
    adapter = finetuned(method) / "adapter"
    capsys.readouterr()
    argv = [
        "generate",
        "--model",
        str(tiny_llama[0]),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "5",
        "--json",
        "--dtype",
        "fp32",
    ]
    assert main(argv + ["--adapter", str(adapter)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["finish_reason"] in ("length", "stop") and 1 <= res["completion_tokens"] <= 5
    assert res["dtype"] == "float32" and isinstance(res["text"], str)
    # the same greedy answer as the API with the adapter attached
    from slimlm.llm import load

    llm = load(str(tiny_llama[0]), dtype="fp32", adapter=adapter)
    assert llm.complete(["hi"], max_new_tokens=5)[0].text == res["text"]
    assert main(argv + ["--adapter", str(tiny_llama[0])]) == 2  # a model folder is not an adapter
    assert "no adapter_config.json" in capsys.readouterr().err


# --- merge -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "qlora", "bitfit"])
def test_merge_matches_base_plus_adapter(method, tiny_llama, finetuned, tmp_path, capsys):
    adapter, merged = finetuned(method) / "adapter", tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_llama[0]), "--adapter", str(adapter), "--out", str(merged)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == method and report["out"] == str(merged) and report["nf4_base"] == (method == "qlora")
    drift = report["drift_vs_unmerged"]
    assert 0 <= drift["max_logit_diff"] < 1e-4 and abs(drift["kl"]) < 1e-6
    assert ("drift_vs_full_precision_base" in report) == (method == "qlora")
    ids = _probe_ids(tiny_llama[0])
    hf = _hf_logits(merged, ids)  # transformers reads the merged folder (BitFit: with biases)
    assert (hf - _slimlm_logits(tiny_llama[0], ids, adapter)).abs().max() <= 1e-4
    assert all((merged / f).is_file() for f in ("config.json", "model.safetensors", *TOKENIZER_FILES))


def test_merge_qlora_reports_drift_against_the_full_precision_base(tiny_llama, finetuned, tmp_path, capsys):
    from slimlm.checkpoint import load_model
    from slimlm.peft import apply_peft, get_method, read_adapter_config
    from slimlm.peft.common import read_adapter_files
    from slimlm.peft.merge import PROBE
    from slimlm.tokenizer import Tokenizer

    adapter, merged = finetuned("qlora") / "adapter", tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_llama[0]), "--adapter", str(adapter), "--out", str(merged)]) == 0
    report = json.loads(capsys.readouterr().out)
    # the adapter as LoRA on the unquantized base, vs the merged model
    tok = Tokenizer.from_pretrained(tiny_llama[0])
    ids = torch.tensor([tok.encode(PROBE)])
    fp = load_model(tiny_llama[0])[2]
    apply_peft(fp, "lora", read_adapter_config(adapter)[1], tok, nf4_base=False)
    get_method("lora").load_state_dict(fp, read_adapter_files(adapter)[1])
    with torch.no_grad():
        expected = (fp(ids) - _hf_logits(merged, ids)).abs().max().item()
    assert expected > 1e-2  # NF4 rounding of random weights moves the logits visibly
    assert report["drift_vs_full_precision_base"]["max_logit_diff"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("method", ["prefix", "prompt", "adapter"])
def test_merge_refuses_methods_that_cannot_merge(method, tiny_llama, finetuned, tmp_path, capsys):
    adapter, merged = finetuned(method) / "adapter", tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_llama[0]), "--adapter", str(adapter), "--out", str(merged)]) == 2
    assert f"slimlm merge: error: {method} cannot be merged" in capsys.readouterr().err
    assert not merged.exists()


# --- info on an adapter folder -----------------------------------------------------------------------------------


def test_info_on_adapters(tiny_llama, finetuned, capsys):
    adapter = finetuned("bitfit") / "adapter"
    capsys.readouterr()
    assert main(["info", "--model", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "method      bitfit" in text and "peft_type   SLIMLM_BITFIT" in text
    assert "note        BitFit adds zero-initialised biases" in text
    assert main(["info", "--model", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert info["method"] == "bitfit" and info["base_model"] == str(tiny_llama[0])
    assert info["parameters"] == sum(t.numel() for t in tensors.values()) and info["tensors"] == len(tensors)
    assert info["note"].startswith("BitFit adds") and info["config"]["train_norms"] is False
    assert main(["info", "--model", str(finetuned("lora") / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["note"] == "" and info["config"]["r"] == 16


# --- resume through the CLI --------------------------------------------------------------------------------------


def test_resume_a_finished_run_redoes_the_steps_after_the_last_checkpoint(tiny_llama, chat_data, tmp_path, capsys):
    """Checkpoints are written every save_every steps but not at the end (the adapter is the final save), so
    resuming a finished run restarts from the last checkpoint and redoes the remaining steps: the same adapter."""
    out = tmp_path / "run"
    argv = _finetune_argv(tiny_llama[0], "lora", chat_data, out, "--train.save_every", "1")
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    first = load_file(out / "adapter" / "adapter_model.safetensors")
    first_metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert main(argv) == 2  # without --resume the old checkpoints are not silently mixed in
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "resumed from" in captured.err and "step-000002 (step 2)" in captured.err
    assert "done: 3 steps" in captured.out
    second = load_file(out / "adapter" / "adapter_model.safetensors")
    assert second.keys() == first.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == first_metrics.splitlines()[:2]  # kept as written
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    old = [json.loads(line) for line in first_metrics.splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in old] == [1, 2, 3, 3]
    assert lines[2]["loss"] == old[2]["loss"] and lines[3]["eval_loss"] == old[3]["eval_loss"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert load_recipe(FinetuneConfig, out / "recipe.yaml").resume is True


def test_resume_without_checkpoints_starts_fresh(tiny_llama, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_finetune_argv(tiny_llama[0], "lora", chat_data, out, "--train.max_steps", "1", "--resume")) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_bundled_recipes_load():
    """Every recipe in recipes/ maps onto FinetuneConfig (keys and types), so `slimlm finetune RECIPE` starts."""
    from pathlib import Path

    from slimlm.recipe import load_recipe
    from slimlm.train.finetune import FinetuneConfig

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_recipe(FinetuneConfig, path)
        cfg.method_config().validate()
        cfg.train.validate()
