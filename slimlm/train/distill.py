"""`slimlm distill`: train a smaller student to match a teacher's token distributions on SFT data.

Loss per labelled (assistant) token: α·T²·KL(teacher_T, student_T) + (1−α)·CE(labels) (train/kd_loss.py). The
teacher runs on the fly (eval mode, no grad, same batch) or from a top-k cache built once (train/teacher_cache.py).
The student is (a) a preset with random weights (`student: preset:NAME`), (b) the teacher with only
`student_layers` of its layers kept (slimlm.prune.layers, the default when `student` is empty), or (c) any model
folder/alias (e.g. a pruned model). It trains all its parameters; α = 0 is the hard-label baseline.

DistillConfig is the whole run in one dataclass; a YAML recipe maps onto it 1:1 and flags override it
(slimlm/recipe.py). The loop is train/trainer.py's `train` with a loss hook. Outputs: `OUT/model/` (HF folder with
the tokenizer), `OUT/metrics.jsonl`, `OUT/summary.json`, `OUT/recipe.yaml`, and `OUT/teacher_topk.safetensors`
with the top-k cache.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimlm.checkpoint.atomic import write_text_atomic
from slimlm.errors import InputError
from slimlm.train.data import DataConfig, load_dataset, run_data_errors
from slimlm.train.distributed import barrier, device_for, dist_info, full_state_dict, init_distributed
from slimlm.train.kd_loss import KL_DIRECTIONS, DenseTeacher, KDSettings, chunked_kd_loss, labelled_rows
from slimlm.train.trainer import LossFn, SampleStream, TrainConfig, TrainResult, train

TEACHER_CACHES = ("none", "topk")


@dataclass
class DistillConfig:
    teacher: str = "smollm2-135m"  # alias, HF folder, .gguf file or hub id
    teacher_adapter: str | None = None  # a fine-tuned adapter folder; merged into the teacher's weights
    student: str | None = None  # model folder/alias, or "preset:NAME" (random init); empty: layers of the teacher
    student_layers: int | None = None  # keep this many of the teacher's layers (every other); n_layers of a preset
    alpha: float = 0.5  # KL weight; 0 = hard labels only (the baseline), 1 = teacher only
    temperature: float = 2.0  # T: both distributions are softened by T, the KL term scaled by T^2
    kl: str = "forward"  # forward = KL(teacher‖student) | reverse = KL(student‖teacher)
    teacher_cache: str = "none"  # none (teacher forward in every step) | topk (one pre-pass, cached top-k)
    top_k: int = 64  # teacher_cache topk: teacher log-probs kept per token
    teacher_cache_path: str | None = None  # default OUT/teacher_topk.safetensors
    kd_chunk_size: int = 512  # rows of [tokens, vocab] logits computed at once
    # training data: a .jsonl, .parquet, .csv or .json file, a folder of them, or a Hugging Face dataset name
    # (--dataset.split/subset); chat, alpaca, prompt/completion or text records (rename: --dataset.columns)
    data: str = ""
    # validation data, the same kinds (a hub dataset's --dataset.eval_split): eval loss, and generation for chat
    eval_data: str | None = None
    out: str = "runs/distill"  # output folder: model/, metrics.jsonl, summary.json, recipe.yaml
    device: str = "cpu"  # cpu, cuda or cuda:N
    task: str | None = None  # a bundled task whose scorer rates eval generations
    eval_generate: int = 0  # exact match of teacher and student on this many eval records (0: none)
    eval_max_new_tokens: int = 64  # the longest answer generated per eval record
    resume: bool = False  # continue from the newest checkpoint in OUT/checkpoints
    dataset: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Check the whole run before anything is loaded; one error lists every problem and what to change."""
        errors = []
        if not self.teacher:
            errors.append("no teacher: pass --teacher MODEL")
        if self.teacher_adapter and not Path(self.teacher_adapter).is_dir():
            errors.append(f"teacher adapter {self.teacher_adapter} is not a folder")
        if not self.student and self.student_layers is None:
            errors.append("no student: pass --student MODEL (or preset:NAME) or --student-layers N")
        if self.student_layers is not None and (not _is_int(self.student_layers) or self.student_layers < 1):
            errors.append(f"student_layers must be a positive integer, got {self.student_layers!r}")
        if self.student and self.student_layers is not None and not self.student.startswith("preset:"):
            errors.append("student_layers applies to the teacher or a preset; a --student folder is used as it is")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            errors.append(f"alpha must be in [0, 1] (0 = hard labels only, 1 = KL only), got {self.alpha!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            errors.append(f"temperature must be > 0, got {self.temperature!r}")
        if self.kl not in KL_DIRECTIONS:
            errors.append(f"kl must be one of {', '.join(KL_DIRECTIONS)}, got {self.kl!r}")
        if self.teacher_cache not in TEACHER_CACHES:
            errors.append(f"teacher_cache must be one of {', '.join(TEACHER_CACHES)}, got {self.teacher_cache!r}")
        for name in ("top_k", "kd_chunk_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                errors.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        errors += run_data_errors(self.data, self.eval_data, self.eval_generate, self.task)
        for section in (self.dataset, self.train):
            try:
                section.validate()
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise InputError("invalid distillation config:\n  - " + "\n  - ".join(errors))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class DistillResult:
    out: Path
    output: Path  # the student's HF folder
    student_params: int
    teacher_params: int
    train: TrainResult
    teacher_eval: dict[str, float]  # {"exact_match", "n"} when eval_generate > 0
    student_eval: dict[str, float]
    cache: dict[str, Any]  # {"path", "built_samples", "build_s"} for teacher_cache = topk


# ---- models ------------------------------------------------------------------------------------------------------


def load_teacher(source: str, adapter: str | None, device: torch.device) -> tuple[Path, nn.Module]:
    """The teacher in fp32 eval mode, frozen, with the adapter (if any) merged into its weights."""
    from slimlm.checkpoint import load_model
    from slimlm.peft import load_adapter, merge_adapter

    path, _, teacher = load_model(source, torch.float32, device)
    if adapter:
        load_adapter(teacher, adapter)
        merge_adapter(teacher)  # plain linears again: no adapter work in each teacher forward
    teacher.eval().requires_grad_(False)
    return path, teacher


def make_student(cfg: DistillConfig, teacher: nn.Module, device: torch.device) -> nn.Module:
    """(a) preset:NAME with random weights, (b) the teacher's every-other layers, (c) a model folder; all trainable."""
    from slimlm.checkpoint import load_model
    from slimlm.config import ModelConfig
    from slimlm.model import Transformer
    from slimlm.prune.layers import drop_layers, every_other_layer

    if cfg.student and cfg.student.startswith("preset:"):
        config = ModelConfig.from_name(cfg.student.removeprefix("preset:"))
        if cfg.student_layers is not None:
            config = replace(config, n_layers=cfg.student_layers)
        torch.manual_seed(cfg.train.seed)
        student = Transformer(config).to(device)
    elif cfg.student:
        _, _, student = load_model(cfg.student, torch.float32, device)
    else:
        student = drop_layers(teacher, every_other_layer(teacher.config.n_layers, cfg.student_layers))
    if student.config.vocab_size != teacher.config.vocab_size:
        raise InputError(
            f"the student's vocabulary ({student.config.vocab_size}) differs from the teacher's "
            f"({teacher.config.vocab_size}); distillation needs the same tokenizer"
        )
    return student.train().requires_grad_(True)


# ---- the loss hook -----------------------------------------------------------------------------------------------


def online_loss(teacher: nn.Module, settings: KDSettings, chunk_size: int) -> LossFn:
    """KD loss with the teacher's forward pass on the same batch (eval mode, no grad)."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        seg = batch.get("segment_ids")
        with torch.no_grad():
            th, _ = labelled_rows(teacher.hidden(batch["input_ids"], segment_ids=seg), batch["labels"])  # [N, Dt]
        h = model.hidden(batch["input_ids"], segment_ids=seg)  # [B, T, D]
        return chunked_kd_loss(
            h, batch["labels"], model.lm_head, DenseTeacher(th, teacher.lm_head), settings, chunk_size
        )

    return loss_fn


def cached_loss(cache: Any, settings: KDSettings, chunk_size: int) -> LossFn:
    """KD loss against the cached top-k teacher rows of the batch's samples (batch["sample_index"])."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        target = cache.lookup(batch["sample_index"].tolist())
        h = model.hidden(batch["input_ids"], segment_ids=batch.get("segment_ids"))
        return chunked_kd_loss(h, batch["labels"], model.lm_head, target, settings, chunk_size)

    return loss_fn


def visited_samples(n_samples: int, cfg: TrainConfig) -> list[int]:
    """Indices of the samples a run of cfg.total_steps reads (the trainer's SampleStream, replayed)."""
    stream = SampleStream(list(range(n_samples)), cfg.batch_size, cfg.seed)
    steps = cfg.total_steps(n_samples)
    return sorted({i for _ in range(steps) for idx, _ in stream.next_step(cfg.grad_accum) for i in idx})


# ---- the job -----------------------------------------------------------------------------------------------------


def distill(cfg: DistillConfig, progress: bool = True) -> DistillResult | None:
    """Run a whole distillation job as configured; returns where the student is and what was measured.

    Under torchrun every process calls it: the teacher is replicated on each rank, the top-k cache is built once by
    rank 0, rank 0 writes every output and gets the result (the other ranks get None)."""
    from slimlm.checkpoint.hf import save_hf_folder
    from slimlm.device import resolve_device
    from slimlm.recipe import to_dict
    from slimlm.tokenizer import Tokenizer
    from slimlm.train.finetune import _eval_data_config, _yaml

    cfg.validate()
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)  # a world of 1 unless launched by torchrun
    out, device = Path(cfg.out), resolve_device(device_for(info, cfg.device))
    teacher_path, teacher = load_teacher(cfg.teacher, cfg.teacher_adapter, device)  # replicated on every rank
    tokenizer = Tokenizer.from_pretrained(teacher_path)
    student = make_student(cfg, teacher, device)
    sharded = info.distributed and cfg.train.strategy == "fsdp"
    whole = copy.deepcopy(student) if sharded and info.is_main else None  # rank 0's plain copy, to save from
    train_samples, stats = load_dataset(cfg.data, tokenizer, cfg.dataset)
    eval_samples = load_dataset(cfg.eval_data, tokenizer, _eval_data_config(cfg.dataset))[0] if cfg.eval_data else None
    records = _eval_records(cfg)
    teacher_eval = _exact_match(teacher, tokenizer, records, cfg) if info.is_main else {}  # rank 0 generates
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        write_text_atomic(out / "recipe.yaml", _yaml(to_dict(cfg)))
    settings = KDSettings(float(cfg.alpha), float(cfg.temperature), cfg.kl)
    loss_fn, cache_info = _loss_fn(cfg, settings, teacher, train_samples, tokenizer.pad_id, out)
    if cfg.alpha == 0:
        del teacher  # hard labels only: the teacher's memory is not needed while training
    eval_fn = (lambda m: _exact_match(m, tokenizer, records, cfg)) if records and cfg.train.eval_every else None
    result = train(
        student,
        train_samples,
        cfg.train,
        out,
        eval_samples=eval_samples,
        pad_id=tokenizer.pad_id,
        eval_fn=eval_fn,
        resume=cfg.resume,
        progress=progress,
        loss_fn=loss_fn,
    )
    if sharded:  # gather the shards (every rank), then rank 0 carries on with its plain copy
        state = full_state_dict(student, keep=info.is_main)
        student = whole
        if student is not None:
            student.load_state_dict(state)
    res = None
    if info.is_main:
        student_eval = _exact_match(student, tokenizer, records, cfg)
        output = save_hf_folder(student, out / "model", tokenizer.hf, sorted(tokenizer.stop_token_ids))
        res = DistillResult(
            out,
            output,
            _n_params(student),
            _n_params_of(cfg, teacher_path),
            result,
            teacher_eval,
            student_eval,
            cache_info,
        )
        write_text_atomic(out / "summary.json", json.dumps(_summary_json(cfg, res, stats), indent=2))
    barrier()  # every rank returns once the outputs exist (the others return None)
    return res


def _loss_fn(
    cfg: DistillConfig, settings: KDSettings, teacher: nn.Module, samples: list, pad_id: int, out: Path
) -> tuple[LossFn | None, dict[str, Any]]:
    """The trainer's loss hook: None (plain CE) for α = 0, else on the fly or from the (built or reused) cache."""
    from slimlm.train.teacher_cache import build_or_load, teacher_id

    if cfg.alpha == 0:
        return None, {}
    if cfg.teacher_cache == "none":
        return online_loss(teacher, settings, cfg.kd_chunk_size), {}
    path = Path(cfg.teacher_cache_path or out / "teacher_topk.safetensors")
    t0 = time.perf_counter()

    def build() -> tuple[Any, int]:
        return build_or_load(
            path,
            teacher,
            samples,
            visited_samples(len(samples), cfg.train),
            cfg.top_k,
            teacher_id(cfg.teacher, cfg.teacher_adapter),
            cfg.train.batch_size,
            pad_id,
        )

    # Several processes: rank 0 builds (or extends) the cache file once; the others wait, then read it (a shared
    # filesystem is assumed, as for resuming).
    main = dist_info().is_main
    cache, built = build() if main else (None, 0)
    barrier()
    if not main:
        cache, built = build()
    info = {
        "path": str(path),
        "built_samples": built,
        "build_s": time.perf_counter() - t0,
        "top_k": cfg.top_k,
        "rows": int(cache.values.shape[0]),
    }
    return cached_loss(cache, settings, cfg.kd_chunk_size), info


def _eval_records(cfg: DistillConfig) -> list:
    from slimlm.train.data import chat_prompts

    if not (cfg.eval_data and cfg.eval_generate):
        return []
    return chat_prompts(cfg.eval_data, cfg.dataset, cfg.dataset.eval_split)[: cfg.eval_generate]


def _exact_match(model: nn.Module, tokenizer: Any, records: list, cfg: DistillConfig) -> dict[str, float]:
    from slimlm.eval.task_accuracy import generation_accuracy

    return generation_accuracy(model, tokenizer, records, cfg.task, cfg.eval_max_new_tokens) if records else {}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied weights counted once


def _n_params_of(cfg: DistillConfig, path: Path) -> int:
    from slimlm.checkpoint.hf import read_hf_config

    return read_hf_config(path).num_params() if path.is_dir() else 0


def _summary_json(cfg: DistillConfig, res: DistillResult, stats: Any) -> dict[str, Any]:
    t = res.train
    return {
        "teacher": cfg.teacher,
        "teacher_adapter": cfg.teacher_adapter,
        "student": cfg.student or f"{cfg.student_layers} layers of the teacher",
        "output": str(res.output),
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "kl": cfg.kl,
        "teacher_cache": cfg.teacher_cache,
        "student_params": res.student_params,
        "teacher_params": res.teacher_params,
        "steps": t.steps,
        "final_loss": t.final_loss,
        "eval": t.eval_metrics,
        "teacher_exact_match": res.teacher_eval,
        "student_exact_match": res.student_eval,
        "tokens_per_s": t.tokens_per_s,
        "elapsed_s": t.elapsed_s,
        "cache": res.cache,
        "data": {"records": stats.records, "samples": stats.samples, "trained_tokens": stats.trained_tokens},
    }


__all__ = [
    "DistillConfig",
    "DistillResult",
    "distill",
    "load_teacher",
    "make_student",
    "online_loss",
    "cached_loss",
    "visited_samples",
]
