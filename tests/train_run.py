"""A tiny, deterministic training run for test_trainer.py: imported for its helpers, or run as a subprocess.

    python tests/train_run.py OUT_DIR {full,kill,resume} WEIGHTS_FILE [steps|epochs]

`kill` SIGKILLs itself at the end of step KILL_AT (after the step-2 checkpoint); `full` and `resume` train to the
end and save the final trainable weights to WEIGHTS_FILE (safetensors) for a torch.equal comparison. The last
argument picks the run's config: RESUME_CFG (max_steps; its step-2 checkpoint ends an epoch) or RESUME_EPOCHS_CFG
(num_epochs; its step-2 checkpoint is mid-epoch, and every third step is an epoch's short last one).
"""

from __future__ import annotations

import os
import random
import signal
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

from slimlm.config import ModelConfig
from slimlm.model import Transformer
from slimlm.train.batch import IGNORE, Sample
from slimlm.train.trainer import TrainConfig, train

KILL_AT = 3
RESUME_CFG = dict(
    max_steps=6,
    batch_size=3,
    grad_accum=2,
    lr=1e-3,
    warmup_steps=2,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    save_every=2,
    keep_checkpoints=2,
    seed=7,
)
# 10 samples in micro-batches of 2: 5 per epoch, so 3 steps per epoch (2 + 2 + 1 micro-batches), 6 in all.
RESUME_EPOCHS_CFG = {**{k: v for k, v in RESUME_CFG.items() if k != "max_steps"}, "num_epochs": 2, "batch_size": 2}
RESUME_CONFIGS = {"steps": RESUME_CFG, "epochs": RESUME_EPOCHS_CFG}


def tiny_model(seed: int = 0, dropout: float = 0.0, **overrides) -> Transformer:
    """The 2-layer 64-dim random "tiny" preset; dropout > 0 puts a Dropout in front of every q_proj."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**ModelConfig.from_name("tiny").to_dict(), **overrides}))
    if dropout:
        for layer in model.layers:
            layer.self_attn.q_proj = nn.Sequential(nn.Dropout(dropout), layer.self_attn.q_proj)
    return model


def make_samples(
    n: int, seed: int = 0, vocab: int = 256, prompt: int = 3, lengths: tuple[int, int] = (6, 14)
) -> list[Sample]:
    """Random token samples of varied length whose first `prompt` positions take no loss (like SFT)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))]
        samples.append(Sample(ids, [IGNORE] * prompt + ids[prompt + 1 :] + [IGNORE]))
    return samples


def main(out_dir: str, mode: str, weights_file: str, config: str = "steps") -> None:
    torch.set_num_threads(1)  # one thread: reductions run in one fixed order
    # Dropout draws from the global RNG, so a bit-identical resume also needs the RNG state restored. The
    # embedding is frozen, as in PEFT: the trainer must neither update nor save it.
    model = tiny_model(seed=0, dropout=0.1)
    model.embed_tokens.weight.requires_grad_(False)

    def kill(step: int) -> None:
        if step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    train(
        model,
        make_samples(10, seed=1),
        TrainConfig(**RESUME_CONFIGS[config]),
        out_dir,
        progress=False,
        resume=mode == "resume",
        on_step_end=kill if mode == "kill" else None,
    )
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, weights_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
