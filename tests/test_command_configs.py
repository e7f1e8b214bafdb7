"""Every command's flags come from its config dataclass (slimlm.recipe): flags and a YAML recipe build the same
config, `--help` shows the dataclass's defaults, and the load flags keep each command's own default."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from slimlm.cli import build_parser
from slimlm.compress.quantize_workflow import QuantizeConfig
from slimlm.engine.core import EngineConfig
from slimlm.load_config import LoadConfig, SaveLoadConfig, ServeLoadConfig
from slimlm.prune.config import PruneConfig
from slimlm.recipe import add_command_flags, config_from_flags, field_default, field_docs, load_recipe
from slimlm.serve.cli import ListenConfig, ServeEngineConfig, ServerEngineConfig, serve_config
from slimlm.serve.state import ServeConfig


def subparser(command: str) -> argparse.ArgumentParser:
    """The parser of `slimlm COMMAND` (or `slimlm COMMAND SUBCOMMAND`: "export onnx")."""
    parser = build_parser()
    for word in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def flag_actions(command: str) -> dict[str, argparse.Action]:
    """{dest: action} of a command's flags."""
    return {a.dest: a for a in subparser(command)._actions if a.option_strings}


def recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


# (command, config class, fields of the class that command has flags for; None = all but skipped)
COMMAND_CONFIGS = [
    ("generate", LoadConfig, None),
    ("info", LoadConfig, ("model",)),
    ("data check", LoadConfig, ("model",)),
    ("export onnx", LoadConfig, ("model", "adapter", "quantize", "group_size")),
    ("export torchscript", LoadConfig, ("model", "adapter", "quantize", "group_size")),
    ("export tflite", LoadConfig, ("model", "adapter", "quantize", "group_size")),
    ("export gguf", LoadConfig, ("model", "adapter")),
    ("export gguf-lora", LoadConfig, ("model", "adapter")),
    ("chat", LoadConfig, None),
    ("eval", LoadConfig, ("model", "dtype", "device", "compile", "adapter", "quantize", "group_size")),
    ("serve", ServeLoadConfig, ("model", "dtype", "device", "quantize", "group_size", "backend")),
    ("batch", ServeLoadConfig, ("model", "dtype", "device", "quantize", "group_size", "backend")),
    ("prune", SaveLoadConfig, ("model", "dtype")),
    ("prune", PruneConfig, None),
    ("quantize", SaveLoadConfig, ("model", "dtype")),
    ("merge", SaveLoadConfig, ("model", "dtype", "adapter")),
    ("fuse", SaveLoadConfig, ("model", "dtype", "adapter")),
    ("quantize", QuantizeConfig, None),
    (
        "serve",
        ServerEngineConfig,
        (
            "max_batch",
            "max_seq_len",
            "max_queue",
            "prefill_chunk",
            "max_loras",
            "max_lora_rank",
            "prefix_cache",
            "prefix_cache_tokens",
            "speculative",
            "num_speculative_tokens",
            "draft_vocab",
            "kv_cache_dtype",
            "request_timeout_s",
        ),
    ),
    (
        "batch",
        ServeEngineConfig,
        (
            "max_batch",
            "max_seq_len",
            "max_queue",
            "prefill_chunk",
            "max_loras",
            "max_lora_rank",
            "prefix_cache",
            "prefix_cache_tokens",
            "speculative",
            "num_speculative_tokens",
            "draft_vocab",
            "kv_cache_dtype",
        ),
    ),
    ("serve", ListenConfig, None),
    (
        "serve",
        ServeConfig,
        (
            "served_name",
            "adapters",
            "registry",
            "draft_model",
            "max_tokens_limit",
            "api_key_file",
            "api_keys",
            "admin_key_file",
            "allow_runtime_lora",
            "lora_roots",
            "models",
            "max_models",
            "load_timeout_s",
            "max_body_bytes",
            "drain_timeout_s",
        ),
    ),
]
SPELLING = {
    "api_keys": "api_key",
    "lora_roots": "lora_root",
    "drain_timeout_s": "drain_timeout",
    "load_timeout_s": "load_timeout",
    "request_timeout_s": "request_timeout",
}  # dest of a renamed flag


@pytest.mark.parametrize("command,cls,names", COMMAND_CONFIGS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_help_defaults_are_the_dataclass_defaults(command, cls, names):
    actions = flag_actions(command)
    fields = [f for f in dataclasses.fields(cls) if names is None or f.name in names]
    assert fields
    docs = field_docs(cls)
    for f in fields:
        action = actions[SPELLING.get(f.name, f.name)]
        default = field_default(f)
        assert action.default == default, (command, f.name)
        if not action.required:
            assert f"(default: {default})" in action.help.replace("%%", "%"), (command, f.name, action.help)
        assert docs[f.name] in action.help.replace("%%", "%"), (command, f.name)  # help text = the field comment


def test_load_flag_defaults_per_command():
    """The one LoadConfig, with each command's default where it differs (dtype: fp32 where a folder is saved;
    serve: quantize auto), and only the load flags each command has."""
    assert flag_actions("generate")["dtype"].default == flag_actions("eval")["dtype"].default == "auto"
    assert flag_actions("serve")["dtype"].default == "auto"
    assert flag_actions("prune")["dtype"].default == flag_actions("quantize")["dtype"].default == "fp32"
    assert flag_actions("merge")["dtype"].default == flag_actions("fuse")["dtype"].default == "fp32"
    assert flag_actions("merge")["adapter"].required and not flag_actions("fuse")["adapter"].required
    assert flag_actions("prune")["dtype"].choices == ["fp32", "bf16"]
    assert flag_actions("generate")["quantize"].default is None
    assert flag_actions("serve")["quantize"].default == flag_actions("batch")["quantize"].default == "auto"
    assert "backend" not in flag_actions("eval") and "backend" in flag_actions("generate")
    assert not {"compile", "adapter"} & set(flag_actions("serve"))
    assert not {"device", "quantize", "compile"} & set(flag_actions("prune"))


def test_load_flags_and_recipe_build_the_same_config(tmp_path):
    args = build_parser().parse_args(
        [
            "generate",
            "--prompt",
            "hi",
            "--model",
            "m",
            "--dtype",
            "bf16",
            "--compile",
            "--quantize",
            "int4",
            "--group-size",
            "32",
        ]
    )
    from_flags = config_from_flags(LoadConfig, args)
    yaml = recipe(tmp_path, "model: m\ndtype: bf16\ncompile: true\nquantize: int4\ngroup_size: 32\n")
    assert from_flags == load_recipe(LoadConfig, yaml)
    assert from_flags != LoadConfig()
    assert config_from_flags(LoadConfig, build_parser().parse_args(["generate"])) == LoadConfig()


def test_prune_flags_and_recipe_build_the_same_config(tmp_path):
    from slimlm.compress.stages import STAGE_KINDS
    from slimlm.recipe import from_dict

    args = build_parser().parse_args(
        [
            "prune",
            "--structured",
            "mlp",
            "--ratio",
            "0.125",
            "--non-uniform",
            "--multiple-of",
            "16",
            "--calib-samples",
            "8",
            "--out",
            "o",
        ]
    )
    from_flags = config_from_flags(PruneConfig, args)
    text = "structured: mlp\nratio: 0.125\nnon_uniform: true\nmultiple_of: 16\ncalib_samples: 8\n"
    assert from_flags == load_recipe(PruneConfig, recipe(tmp_path, text))
    assert STAGE_KINDS["prune"].config is PruneConfig  # the compress chain's prune stage reads the same class
    assert (
        from_dict(
            PruneConfig,
            {"structured": "mlp", "ratio": 0.125, "non_uniform": True, "multiple_of": 16, "calib_samples": 8},
        )
        == from_flags
    )
    assert from_flags.needs_calibration and from_flags.non_uniform is True
    bare = config_from_flags(PruneConfig, build_parser().parse_args(["prune", "--method", "magnitude", "--out", "o"]))
    assert bare == PruneConfig(method="magnitude") and not bare.needs_calibration


def test_prune_config_validates_flags_and_recipes_alike():
    with pytest.raises(ValueError, match="set exactly one of method"):
        PruneConfig().validate()
    with pytest.raises(ValueError, match="--scope global is for --method magnitude"):
        PruneConfig(method="wanda", scope="global").validate()
    with pytest.raises(ValueError, match="--multiple-of must be >= 1"):
        PruneConfig(structured="mlp", multiple_of=0).validate()
    PruneConfig(method="2:4").validate()


def test_quantize_flags_and_recipe_build_the_same_config(tmp_path):
    from slimlm.compress.stages import STAGE_KINDS

    args = build_parser().parse_args(
        [
            "quantize",
            "--scheme",
            "int4",
            "--method",
            "qat",
            "--qat-steps",
            "7",
            "--qat-loss",
            "ce",
            "--smooth",
            "0.5",
            "--out",
            "o",
        ]
    )
    from_flags = config_from_flags(QuantizeConfig, args)
    text = "scheme: int4\nmethod: qat\nqat_steps: 7\nqat_loss: ce\nsmooth: 0.5\n"
    assert from_flags == load_recipe(QuantizeConfig, recipe(tmp_path, text))
    assert STAGE_KINDS["quantize"].config is QuantizeConfig
    defaults = config_from_flags(
        QuantizeConfig, build_parser().parse_args(["quantize", "--scheme", "int8", "--out", "o"])
    )
    assert defaults == QuantizeConfig() and defaults.qat_steps == 100  # stated once, in the dataclass


def test_serve_flags_and_recipe_build_the_same_config(tmp_path):
    args = build_parser().parse_args(
        [
            "batch",
            "in.jsonl",
            "out.jsonl",
            "--model",
            "m",
            "--quantize",
            "none",
            "--max-batch",
            "4",
            "--no-prefix-cache",
            "--speculative",
            "ngram",
            "--adapters",
            "a=x",
            "--max-tokens-limit",
            "99",
        ]
    )
    from_flags = serve_config(args)
    text = (
        "model: m\nquantize: null\nadapters: [a=x]\nmax_tokens_limit: 99\n"
        "engine: {max_batch: 4, max_seq_len: 0, prefix_cache: false, speculative: ngram}\n"
    )
    assert from_flags == load_recipe(ServeConfig, recipe(tmp_path, text))
    assert type(from_flags.engine) is EngineConfig  # the engine sees its plain config


def test_serve_only_flags(tmp_path):
    args = build_parser().parse_args(
        [
            "serve",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--drain-timeout",
            "3",
            "--load-timeout",
            "5",
            "--max-models",
            "2",
            "--memory-budget",
            "1KiB",
            "--request-timeout",
            "7.5",
            "--models",
            "x=y",
            "--port",
            "9000",
        ]
    )
    assert (args.api_key, args.drain_timeout, args.load_timeout, args.port) == (["a", "b"], 3.0, 5.0, 9000)
    cfg = serve_config(args, ("drain_timeout_s", "load_timeout_s", "max_models", "models"))
    assert (cfg.drain_timeout_s, cfg.load_timeout_s, cfg.max_models, cfg.models) == (3.0, 5.0, 2, ["x=y"])
    assert cfg.engine.request_timeout_s == 7.5 and cfg.api_keys == []  # api_keys: not among the fields asked for
    batch = serve_config(build_parser().parse_args(["batch", "i", "o"]))
    assert batch.engine.request_timeout_s == 0.0 and batch.engine.max_batch == 0  # batch waits; sized for the host


def test_add_command_flags_metadata():
    @dataclasses.dataclass
    class Settings:
        name: str = "x"  # what to call it
        # how long to wait
        wait_s: float = dataclasses.field(default=1.5, metadata={"flag": "--wait", "metavar": "SECONDS"})
        tags: list[str] = dataclasses.field(default_factory=list, metadata={"flag": "--tag", "action": "append"})
        fast: bool = dataclasses.field(default=True, metadata={"negatable": True})  # go fast
        level: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
        verbose: bool = False

    @dataclasses.dataclass
    class LoudSettings(Settings):
        level: str = dataclasses.field(default="b", metadata={"choices": ("a", "b")})

    parser = argparse.ArgumentParser()
    add_command_flags(parser, LoudSettings)
    args = parser.parse_args(["--wait", "2", "--tag", "p", "--tag", "q", "--no-fast", "--verbose"])
    assert config_from_flags(LoudSettings, args) == LoudSettings(wait_s=2.0, tags=["p", "q"], fast=False, verbose=True)
    assert config_from_flags(LoudSettings, parser.parse_args([])) == LoudSettings()
    assert field_docs(LoudSettings)["name"] == "what to call it"  # a subclass keeps its base's comments
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["wait"] == "how long to wait (default: 1.5)" and helps["level"] == "(default: b)"
    with pytest.raises(SystemExit):
        parser.parse_args(["--level", "c"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--wait", "soon"])
