"""LoadConfig: how a command loads its model (the flags --model, --dtype, --device, --quantize, ...), declared once.

Commands add these flags with `recipe.add_command_flags(parser, LoadConfig, skip=...)` and read them back with
`recipe.config_from_flags(LoadConfig, args)`. Where a command's default differs (serve quantizes to int8 on a CPU
by default; prune and quantize load, change and save fp32 weights), it uses a subclass below that re-declares the
field: the default is stated once, in that subclass, and the help text stays the base's comment.
This module only declares the settings; `slimlm.llm.load` acts on them. It imports nothing from slimlm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("auto", "fp32", "bf16", "fp16")  # auto = bf16 where the hardware runs it natively, else fp32
SAVE_DTYPES = ("fp32", "bf16")  # what a command that writes a model folder saves in
LOAD_QUANTIZE = ("int8", "int8-dynamic", "int4")  # schemes applied right after loading
BACKENDS = ("torch", "onnxruntime")


@dataclass
class LoadConfig:
    """The model to load and how: the load flags of generate, chat and eval (serve and batch: ServeLoadConfig)."""

    model: str = "smollm2-135m"  # alias (smollm2-135m), HF model folder, .gguf file or HF hub id
    # weights and compute dtype; auto = bf16 where the hardware runs it natively, else fp32
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    device: str = "cpu"  # cpu, cuda or cuda:N
    # torch.compile the decode step (first call compiles for a minute or more; then faster)
    compile: bool = False
    adapter: str | None = None  # fine-tuned adapter folder to attach (slimlm or HF PEFT layout)
    # quantize the weights after loading (int4: --group-size, default 64)
    quantize: str | None = field(default=None, metadata={"choices": LOAD_QUANTIZE})
    group_size: int = 64  # int4 group size: 32, 64 or 128
    # onnxruntime: --model is a folder from `slimlm export onnx`, run by ONNX Runtime
    backend: str = field(default="torch", metadata={"choices": BACKENDS})


@dataclass
class ServeLoadConfig(LoadConfig):
    """`slimlm serve` / `batch`: quantize defaults to auto (flags --compile and --adapter are not theirs)."""

    # quantize the base model's weights after loading (slimlm.quantize). auto: int8 weight-only with fp32
    # activations on a CPU, where the fused decode step reads one byte per weight (+0.2% perplexity on SmolLM2),
    # nothing on a GPU; none: serve the weights as loaded
    quantize: str | None = field(default="auto", metadata={"choices": ("auto", "none", *LOAD_QUANTIZE)})


@dataclass
class SaveLoadConfig(LoadConfig):
    """Commands that load a model, change it and save a folder (prune, quantize): fp32 by default, no auto."""

    # dtype to load, change and save the weights in (quantize: of what stays unquantized, e.g. the norms)
    dtype: str = field(default="fp32", metadata={"choices": SAVE_DTYPES})


# The load flags each command has (the others are skipped when its flags are added).
SERVE_SKIP = ("compile", "adapter")
EVAL_SKIP = ("backend",)
SAVE_SKIP = ("device", "compile", "adapter", "quantize", "group_size", "backend")
EXPORT_SKIP = ("dtype", "device", "compile", "backend")  # export onnx|torchscript|tflite: model, adapter, quantize
GGUF_SKIP = ("dtype", "device", "compile", "quantize", "group_size", "backend")  # export gguf|gguf-lora
MODEL_ONLY_SKIP = ("dtype", "device", "compile", "adapter", "quantize", "group_size", "backend")  # data check, info
