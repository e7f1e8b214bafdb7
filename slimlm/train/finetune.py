"""`slimlm finetune`: load a base model, apply a method, build the SFT data, train, save the result.

FinetuneConfig is the whole run in one dataclass; a YAML recipe maps onto it 1:1 and flags override it
(slimlm/recipe.py). The training loop itself is train/trainer.py; this file wires the pieces together and writes
the outputs: `OUT/adapter/` (HF PEFT layout where the method exists in PEFT) or `OUT/model/` (full fine-tuning, an
HF folder), `OUT/metrics.jsonl`, `OUT/training.png`, `OUT/summary.json` and the resolved `OUT/recipe.yaml`.
Under torchrun every process runs `finetune` (train/distributed.py); rank 0 alone writes the outputs, the same
files one process writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimlm.checkpoint.atomic import write_text_atomic
from slimlm.errors import InputError
from slimlm.eval.task_accuracy import generation_accuracy
from slimlm.peft import PEFT_METHODS, apply_peft, save_adapter
from slimlm.peft.adapter import AdapterConfig
from slimlm.peft.bitfit import BitFitConfig
from slimlm.peft.lora import LoraConfig
from slimlm.peft.prefix import PrefixConfig
from slimlm.peft.prompt import PromptConfig, input_prefix_ids
from slimlm.train.data import DataConfig, chat_prompts, load_dataset, run_data_errors
from slimlm.train.distributed import barrier, device_for, full_state_dict, init_distributed
from slimlm.train.plot import plot_metrics
from slimlm.train.trainer import TrainConfig, TrainResult, train


@dataclass
class FinetuneConfig:
    model: str = "smollm2-135m"  # alias, HF folder, .gguf file or hub id
    base_name: str | None = None  # adapter's base_model_name_or_path (default: model's hub id or absolute path)
    method: str = "lora"  # full | lora | qlora | adapter | bitfit | prefix | prompt
    # training data: a .jsonl, .parquet, .csv or .json file, a folder of them, or a Hugging Face dataset name
    # (--dataset.split/subset); chat, alpaca, prompt/completion or text records (rename: --dataset.columns)
    data: str = ""
    # validation data, the same kinds (a hub dataset's --dataset.eval_split): eval loss, and generation for chat
    eval_data: str | None = None
    out: str = "runs/finetune"  # output folder: adapter/ or model/, metrics.jsonl, training.png, summary.json
    nf4_base: bool = False  # freeze the base as NF4 4-bit weights (implied by qlora; not for full)
    dtype: str = "fp32"  # the base model's weights in memory: fp32 | bf16 (compute precision is train.precision)
    device: str = "cpu"  # cpu, cuda or cuda:N
    task: str | None = None  # a bundled task (e.g. extract_json) whose scorer rates eval generations
    eval_generate: int = 0  # generate answers for this many eval records at each eval (0: loss only)
    eval_max_new_tokens: int = 64  # the longest answer generated per eval record
    resume: bool = False  # continue from the newest checkpoint in OUT/checkpoints
    dataset: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # also qlora's
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    bitfit: BitFitConfig = field(default_factory=BitFitConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def validate(self) -> None:
        """Check the whole run before anything is loaded; one error lists every problem."""
        errors = []
        if self.method not in PEFT_METHODS:
            errors.append(f"method {self.method!r} is unknown; choose from {', '.join(PEFT_METHODS)}")
        errors += run_data_errors(self.data, self.eval_data, self.eval_generate, self.task)
        if self.method == "full" and self.nf4_base:
            errors.append("full fine-tuning cannot use an NF4 base (it trains the base weights)")
        if self.dtype not in ("fp32", "bf16"):
            errors.append(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        for section in (self.dataset, self.train, self.method_config()):
            try:
                section.validate()
            except ValueError as e:
                errors.append(str(e))
        if len(errors) == 1:  # one problem, one line
            raise InputError(f"invalid fine-tuning config: {errors[0]}")
        if errors:
            raise InputError("invalid fine-tuning config:\n  - " + "\n  - ".join(errors))

    def method_config(self) -> Any:
        """The config section of the chosen method (qlora reads `lora`; full has none)."""
        section = {"qlora": "lora"}.get(self.method, self.method)
        return getattr(self, section, PEFT_METHODS["full"].config_cls())


@dataclass
class FinetuneResult:
    out: Path
    output: Path  # the adapter folder or the full model folder
    trainable: int
    total: int
    train: TrainResult
    data: dict[str, Any]


def finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneResult:
    """Run a whole fine-tuning job as configured; returns where the result is and what was measured."""
    from slimlm.checkpoint import load_model
    from slimlm.checkpoint.hf import save_hf_folder
    from slimlm.device import resolve_device
    from slimlm.recipe import to_dict
    from slimlm.tokenizer import Tokenizer

    cfg.validate()
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)  # a world of 1 unless launched by torchrun
    out = Path(cfg.out)
    device = resolve_device(device_for(info, cfg.device))
    dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
    path, _, model = load_model(cfg.model, dtype, device)
    tokenizer = Tokenizer.from_pretrained(path)
    train_samples, train_stats = load_dataset(cfg.data, tokenizer, cfg.dataset)
    eval_samples, eval_records = None, []
    if cfg.eval_data:
        eval_samples, _ = load_dataset(cfg.eval_data, tokenizer, _eval_data_config(cfg.dataset))
        eval_records = chat_prompts(cfg.eval_data, cfg.dataset, cfg.dataset.eval_split)[: cfg.eval_generate]
        _check_eval_lengths(eval_records, tokenizer, cfg.eval_max_new_tokens, model.config.max_seq_len)
    torch.manual_seed(cfg.train.seed)  # the adapter's random init (LoRA A, soft prompt, ...) is part of the run
    summary = apply_peft(model, cfg.method, cfg.method_config(), tokenizer, nf4_base=cfg.nf4_base)
    if info.is_main:
        print(f"{cfg.method}: {summary}", flush=True)
    eval_fn = None
    if eval_records:

        def eval_fn(m):
            return generation_accuracy(m, tokenizer, eval_records, cfg.task, cfg.eval_max_new_tokens)

    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        write_text_atomic(out / "recipe.yaml", _yaml(to_dict(cfg)))
    result = train(
        model,
        train_samples,
        cfg.train,
        out,
        eval_samples=eval_samples,
        pad_id=tokenizer.pad_id,
        input_prefix_ids=input_prefix_ids(model),
        eval_fn=eval_fn,
        resume=cfg.resume,
        progress=progress,
    )
    if info.distributed and cfg.train.strategy == "fsdp":
        model = _whole_model(cfg, model, tokenizer, dtype, device, info.is_main)
    output = out / ("model" if cfg.method == "full" else "adapter")
    if info.is_main and cfg.method == "full":
        output = save_hf_folder(model, output, tokenizer.hf, sorted(tokenizer.stop_token_ids))
    elif info.is_main:
        output = save_adapter(model, output, base_model=str(cfg.model), tokenizer=tokenizer, base_name=cfg.base_name)
    data = {
        "records": train_stats.records,
        "samples": train_stats.samples,
        "truncated": train_stats.truncated,
        "dropped": train_stats.dropped,
        "tokens": train_stats.tokens,
        "trained_tokens": train_stats.trained_tokens,
    }
    res = FinetuneResult(out, output, summary.trainable, summary.total, result, data)
    if info.is_main:
        plot_metrics(result.metrics_path, out / "training.png", f"{cfg.method} on {Path(cfg.data).name}")
        write_text_atomic(out / "summary.json", json.dumps(_summary_json(cfg, res), indent=2))
    barrier()  # every rank returns once the outputs exist
    return res


def _whole_model(
    cfg: FinetuneConfig,
    sharded: torch.nn.Module,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    is_main: bool,
) -> torch.nn.Module | None:
    """The FSDP2-trained model as a plain one on rank 0, to save like a single process's (None elsewhere).

    Every rank gathers the trained tensors (collective; only rank 0 keeps them); rank 0 loads them into a fresh copy
    of the same base and method: its frozen weights are the ones training started from, so only the trained ones
    (all of them for full fine-tuning) need gathering.
    """
    from slimlm.checkpoint import load_model
    from slimlm.train.resume import trainable_parameters

    state = full_state_dict(sharded, set(trainable_parameters(sharded)), keep=is_main)
    if not is_main:
        return None
    model = load_model(cfg.model, dtype, device)[2]
    apply_peft(model, cfg.method, cfg.method_config(), tokenizer, nf4_base=cfg.nf4_base)
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected or set(state) != set(trainable_parameters(model)):
        raise RuntimeError(f"the rebuilt model does not match the trained one ({unexpected or sorted(state)[:5]})")
    return model


def _check_eval_lengths(records: list, tokenizer: Any, max_new_tokens: int, max_seq_len: int) -> None:
    """Fail before training, not after it, if an eval prompt plus its answer cannot fit the model's context."""
    longest = max((len(tokenizer.prompt_ids(p, chat=True)) for p, _ in records), default=0)
    if longest + max_new_tokens > max_seq_len:
        raise InputError(
            f"an eval prompt has {longest} tokens; with eval_max_new_tokens={max_new_tokens} it exceeds "
            f"the model's context of {max_seq_len}: lower --eval-max-new-tokens or --eval-generate"
        )


def _eval_data_config(cfg: DataConfig) -> DataConfig:
    """Eval data is never packed (each record's loss stays its own); a hub dataset gives its eval split."""
    from dataclasses import replace

    return replace(cfg, packing=False, split=cfg.eval_split)


def _summary_json(cfg: FinetuneConfig, res: FinetuneResult) -> dict[str, Any]:
    t = res.train
    return {
        "method": cfg.method,
        "model": cfg.model,
        "output": str(res.output),
        "trainable_params": res.trainable,
        "total_params": res.total,
        "trainable_percent": 100.0 * res.trainable / max(res.total, 1),
        "steps": t.steps,
        "final_loss": t.final_loss,
        "eval": t.eval_metrics,
        "tokens_per_s": t.tokens_per_s,
        "elapsed_s": t.elapsed_s,
        "data": res.data,
    }


def _yaml(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
