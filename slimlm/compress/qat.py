"""Quantization-aware training: train through the rounding, then convert to the real packed format.

`prepare_qat_` swaps every decoder-block nn.Linear for a `FakeQuantLinear`: the forward multiplies by the weight
rounded to the target grid (int4 grouped asymmetric or int8 per channel, with the grid computed from the current
weight exactly as quantize_model_ computes it, bf16 scale/zero included), and the backward passes the gradient to
the full-precision weight unchanged (straight-through estimator, Bengio et al. 2013; the recipe of torchao's QAT).
Training therefore moves the weights to where their *rounded* values work well. `convert_qat_` then quantizes the
trained weights with quantize_model_, whose codes are exactly the grid the forward used, so the converted model
computes what training saw (up to the kernels' bf16 activations).

`qat_train_` runs the trainer (train/trainer.py) over windows of plain text, only the block linears trainable, with
either self-distillation from the full-precision model (default in `slimlm quantize --method qat`) or next-token
cross-entropy. Activations are not fake-quantized: the targets are the weight-only schemes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.quantize.int4 import check_int4_shape, int4_params, int4_round, int4_value
from slimlm.quantize.schemes import linears_of_block, quantize_model_

QAT_SCHEMES = ("int4", "int8")


def fake_quant_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """w [out, in] rounded to its grouped int4 grid (RTN, bf16 scale/zero as stored), as a float tensor."""
    out, n_in = w.shape
    scale, zero = int4_params(w, group)  # [out, in/g], from the detached weight
    s = scale.bfloat16().float()[..., None]
    z = zero.bfloat16().float()[..., None]
    wg = w.float().reshape(out, n_in // group, group)
    return int4_value(int4_round(wg, s, z), s, z).reshape(out, n_in).to(w.dtype)


def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] rounded to its per-channel symmetric int8 grid (absmax / 127)."""
    scale = (w.detach().float().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    return (torch.round(w.float() / scale).clamp(-127, 127) * scale).to(w.dtype)


class FakeQuantLinear(nn.Module):
    """A linear layer trained through its weight's quantization grid (straight-through gradient)."""

    def __init__(self, linear: nn.Linear, scheme: str, group_size: int = 64):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.scheme, self.group_size = scheme, group_size
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def quantized_weight(self) -> torch.Tensor:
        with torch.no_grad():
            wq = (
                fake_quant_int4(self.weight, self.group_size) if self.scheme == "int4" else fake_quant_int8(self.weight)
            )
        return self.weight + (wq - self.weight).detach()  # value of wq, gradient of the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        grid = f"int4 g{self.group_size}" if self.scheme == "int4" else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, fake-quant {grid}"


def prepare_qat_(model: Transformer, scheme: str = "int4", group_size: int = 64) -> Transformer:
    """Swap the block linears for FakeQuantLinear in place; only they stay trainable. Returns the model."""
    if scheme not in QAT_SCHEMES:
        raise InputError(f"QAT supports the weight-only schemes {', '.join(QAT_SCHEMES)}, not {scheme!r}")
    if model.quantization:
        raise InputError("QAT starts from a full-precision model; this one is already quantized")
    targets = [t for block in model.layers for t in linears_of_block(block)]
    for _, attr, layer in targets:
        if not isinstance(layer, nn.Linear):
            raise InputError(f"QAT needs plain nn.Linear layers ({attr} is {type(layer).__name__}): merge adapters")
        if scheme == "int4":
            check_int4_shape(layer.out_features, layer.in_features, group_size)
    model.requires_grad_(False)
    for parent, attr, layer in targets:
        fq = FakeQuantLinear(layer, scheme, group_size)
        fq.weight.requires_grad_(True)
        setattr(parent, attr, fq)
    model.qat = {"scheme": scheme, "group_size": group_size}
    return model


@torch.no_grad()
def convert_qat_(model: Transformer) -> Transformer:
    """Replace the FakeQuantLinear layers by real quantized ones (the same grid); returns the quantized model."""
    qat = model.qat
    if not qat:
        raise ValueError("the model was not prepared for QAT (prepare_qat_)")
    for block in model.layers:
        for parent, attr, layer in linears_of_block(block):
            setattr(parent, attr, layer.to_linear())
    model.qat = None
    model.requires_grad_(False)
    return quantize_model_(model, qat["scheme"], qat["group_size"])


def text_samples(ids: torch.Tensor) -> list:
    """Training samples from windows ids [N, T + 1]: input the first T tokens, predict the next one at each."""
    from slimlm.train.batch import Sample

    return [Sample(input_ids=row[:-1].tolist(), labels=row[1:].tolist()) for row in ids]


def qat_train_(
    model: Transformer,
    train_ids: torch.Tensor,
    out_dir: str | Path,
    steps: int = 100,
    lr: float = 1e-5,
    batch_size: int = 4,
    teacher: nn.Module | None = None,
    progress: bool = True,
):
    """Train a prepare_qat_-ed model on windows train_ids [N, T + 1] of text for `steps` AdamW steps.

    With `teacher` (the full-precision model before prepare_qat_) the loss is KL(teacher ‖ model) on every position
    (self-distillation, as LLM-QAT): the quantized model is pulled toward the function it approximates rather than
    toward the training text, so what it gains on other text is quantization error won back, not domain fit.
    Without a teacher the loss is next-token cross-entropy on the text.
    """
    from slimlm.train.trainer import TrainConfig, train

    if not model.qat:
        raise ValueError("call prepare_qat_ before qat_train_")
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=max(steps // 10, 1),
        min_lr_ratio=0.1,
        max_grad_norm=1.0,
    )
    loss_fn = None
    if teacher is not None:
        from slimlm.train.distill import online_loss
        from slimlm.train.kd_loss import KDSettings

        loss_fn = online_loss(teacher.eval(), KDSettings(alpha=1.0, temperature=1.0), cfg.loss_chunk_size)
    return train(model, text_samples(train_ids), cfg, out_dir, progress=progress, loss_fn=loss_fn)
