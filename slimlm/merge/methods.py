"""Model-merging methods: one plain function per method, over the tensors of one weight, and a registry by name.

Every function gets the same weight (same name, same shape) from each input model and returns the merged tensor.
The arithmetic follows mergekit 0.1.5 step by step (same operations in the same order), so a recipe gives the
same tensors in both tools within fp32 round-off (tests/test_merge_models.py checks it). Inputs are upcast to fp32
(fp64 stays fp64) and the result is returned in that dtype; the caller casts to the output dtype.

This module knows nothing of files, names or recipes: `run.py` reads the models and resolves each tensor's
parameters, `recipe.py` validates them.

Methods (names as in mergekit recipes):
    linear         sum_i w_i * θ_i  (/ sum_i w_i if normalize)                    Wortsman et al. 2203.05482
    task_arithmetic θ_base + λ * sum_i w_i * (θ_i - θ_base)                         Ilharco et al. 2212.04089
    ties           task vectors trimmed to the top-`density` magnitudes, sign election, disjoint mean
                                                                                   Yadav et al. 2306.01708
    dare_linear    task vectors with a random (1 - density) of entries dropped, rescaled, then summed
    dare_ties      the same drop, then TIES' sign election                         Yu et al. 2311.03099
    slerp          spherical interpolation between the base (t=0) and one other model (t=1), per tensor

Chat vector (Huang et al. 2310.04799) is task arithmetic with two task vectors: see `chat_vector`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


def _work(t: Tensor) -> Tensor:
    """The compute dtype: fp32, or fp64 for fp64 inputs (mergekit computes in the input dtype; for fp32 it's equal)."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def linear(tensors: list[Tensor], weights: list[float], normalize: bool = True) -> Tensor:
    """Weighted average (normalize) or weighted sum of the models' tensors."""
    xs = [_work(t) for t in tensors]
    result = torch.zeros_like(xs[0])
    for x, w in zip(xs, weights):
        result.addcmul_(x, torch.tensor(w, dtype=x.dtype))
    if normalize:
        result.div_(torch.tensor(weights, dtype=result.dtype).sum())
    return result


def task_arithmetic(
    base: Tensor, tensors: list[Tensor], weights: list[float], normalize: bool = False, lambda_: float = 1.0
) -> Tensor:
    """θ_base + λ * Σ_i w_i (θ_i - θ_base), divided by Σ_i w_i first if normalize."""
    return _generalized(
        base,
        tensors,
        weights,
        [1.0] * len(tensors),
        mask_fn=None,
        consensus=False,
        normalize=normalize,
        rescale=False,
        lambda_=lambda_,
    )


def chat_vector(target: Tensor, chat: Tensor, base: Tensor, ratio: float = 1.0) -> Tensor:
    """Chat Vector (arXiv 2310.04799): θ_new = θ_target + ratio * (θ_chat - θ_base).

    θ_target is the model to give chat abilities to (in the paper: the base continually pre-trained on a new
    language), θ_chat - θ_base the "chat vector" of a chat model and the base it was tuned from. The paper's code
    (github.com/aqweteddy/ChatVector) adds it to every parameter, norms included; only with `--skip_embed`
    (needed when continual pre-training extended the vocabulary) it leaves `embed_tokens` and `lm_head` as the
    target's. The same merge as a mergekit recipe (what `recipes/merge_chat_vector.yaml` holds):

        merge_method: task_arithmetic      # normalize defaults to false: the two vectors are summed, not averaged
        base_model: BASE
        models:
          - model: TARGET
            parameters: {weight: 1.0}
          - model: CHAT
            parameters:
              weight: RATIO                # skip_embed: [{filter: embed_tokens, value: 0},
                                           #              {filter: lm_head, value: 0}, {value: RATIO}]
        dtype: float32

    since θ_base + 1 * (θ_target - θ_base) + r * (θ_chat - θ_base) = θ_target + r * (θ_chat - θ_base).
    (The filter form needs the same vocabulary in all three models: mergekit and slimlm both refuse tensors whose
    shapes differ.)
    """
    t, c, b = _work(target), _work(chat), _work(base)
    return t + ratio * (c - b)


def ties(
    base: Tensor,
    tensors: list[Tensor],
    weights: list[float],
    densities: list[float],
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = False,
) -> Tensor:
    """TIES: keep each task vector's top-`density` magnitudes, elect a sign per entry by the sum of the weighted
    vectors, and average (normalize) or sum the entries that agree with it. rescale: as in `sparsify`."""
    return _generalized(
        base,
        tensors,
        weights,
        densities,
        mask_fn=magnitude_mask,
        consensus=True,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
    )


def dare_linear(
    base: Tensor,
    tensors: list[Tensor],
    weights: list[float],
    densities: list[float],
    rescale: bool = True,
    normalize: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE + task arithmetic: each task-vector entry is kept with probability `density`, then rescaled (see
    `bernoulli_mask`), and the weighted vectors are summed. `generator` None uses torch's global RNG (as mergekit
    does: the same `torch.manual_seed` gives the same masks)."""
    drop = _bernoulli_with(generator)
    return _generalized(
        base,
        tensors,
        weights,
        densities,
        mask_fn=drop,
        consensus=False,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
    )


def dare_ties(
    base: Tensor,
    tensors: list[Tensor],
    weights: list[float],
    densities: list[float],
    rescale: bool = True,
    normalize: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint merge."""
    drop = _bernoulli_with(generator)
    return _generalized(
        base,
        tensors,
        weights,
        densities,
        mask_fn=drop,
        consensus=True,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
    )


def magnitude_mask(delta: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """1 at the max(1, int(density * numel)) largest |delta| entries, else 0 (same shape and dtype as delta);
    all 0 for density <= 0."""
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    if density <= 0 or delta.numel() == 0:
        return mask.reshape_as(delta)
    k = max(1, int(density * delta.numel()))
    # argsort (not topk) so that equal magnitudes pick the same entries as mergekit
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return mask.reshape_as(delta)


def bernoulli_mask(delta: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """Each entry 1 with probability `density` (DARE's random drop); one torch.bernoulli call, as mergekit makes."""
    return torch.bernoulli(torch.full_like(delta, density), generator=generator)


def _bernoulli_with(generator: torch.Generator | None) -> Callable[..., Tensor]:
    return lambda delta, density: bernoulli_mask(delta, density, generator)


def sparsify(delta: Tensor, density: float, mask_fn: Callable[..., Tensor], rescale: bool) -> Tensor:
    """delta with only the masked entries kept. rescale: multiply by |delta|_1 / |kept|_1, so the L1 norm is kept
    (mergekit's DARE rescale; in expectation this is the paper's 1/density). density >= 1 keeps delta as is and
    draws nothing."""
    if density >= 1:
        return delta
    kept = delta * mask_fn(delta, density)
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:  # nothing left to rescale (or nothing to keep)
        return kept
    return kept * (before / after)


def sign_agreement(deltas: Tensor) -> Tensor:
    """TIES' elected-sign mask. deltas: [n, *shape] weighted task vectors -> bool [n, *shape], True where an entry
    has the sign of the column's sum (ties and zeros of the sum count as +; zero entries never agree)."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


def _generalized(
    base: Tensor,
    tensors: list[Tensor],
    weights: list[float],
    densities: list[float],
    mask_fn: Callable[..., Tensor] | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> Tensor:
    """The task-vector family (mergekit's GeneralizedTaskArithmeticMerge): sparsify, weight, elect, combine."""
    base = _work(base)
    if not tensors:
        return base
    deltas = base.new_empty((len(tensors), *base.shape))  # [n, *shape]
    for i, (t, density) in enumerate(zip(tensors, densities)):
        delta = _work(t) - base
        deltas[i] = sparsify(delta, density, mask_fn, rescale) if mask_fn else delta
    w = torch.tensor(weights, dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))  # [n, 1, ...]
    deltas.mul_(w)
    if consensus:
        mask = sign_agreement(deltas).to(deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed


def slerp(base: Tensor, other: Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of the whole tensor, seen as one vector: t=0 gives `base`, t=1 gives `other`.

    The two tensors' directions are interpolated along the great circle between them, with coefficients
    sin((1-t)θ)/sin θ and sin(tθ)/sin θ applied to the un-normalized tensors (mergekit's form, so norms blend
    too). Nearly parallel or anti-parallel tensors (|cos θ| > dot_threshold) are interpolated linearly.
    """
    a, b = _work(base), _work(other)
    shape = a.shape
    a, b = a.reshape(1, -1), b.reshape(1, -1)  # [1, numel]: one vector per tensor
    tt = torch.tensor(t, dtype=a.dtype)
    if a.shape[1] == 0:
        return ((1 - tt) * a + tt * b).reshape(shape)
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)  # [1, 1]
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)  # cos θ
    near_linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(near_linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(near_linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(near_linear, tt, torch.sin(tt * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(shape)


# ---- registry: how run.py calls each method with one tensor's resolved parameters ----


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as recipes name it.

    merge(base, tensors, per_model, shared, generator) -> tensor, where `tensors` are the non-base models' tensors
    (every listed model's, base included, for methods with needs_base=False), `per_model` their resolved
    parameters and `shared` the method-wide ones (defaults filled in).
    """

    merge: Callable[..., Tensor]
    needs_base: bool
    per_model: dict[str, Any]  # parameter -> default (None: required)
    shared: dict[str, Any]
    n_models: int | None = None  # exact number of non-base models, if fixed
    random: bool = False


def _ta_family(fn: Callable[..., Tensor], density: bool, extra: tuple[str, ...] = (), random: bool = False):
    def merge(base, tensors, per_model, shared, generator=None):
        kwargs = {k: shared[k] for k in extra}
        if density:
            kwargs["densities"] = [p["density"] for p in per_model]
        if random:
            kwargs["generator"] = generator
        return fn(
            base,
            tensors,
            [p["weight"] for p in per_model],
            normalize=shared["normalize"],
            lambda_=shared["lambda"],
            **kwargs,
        )

    return merge


_TA_SHARED = {"normalize": False, "lambda": 1.0, "int8_mask": False}  # int8_mask: a memory option; results equal
MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(
        lambda base, tensors, per_model, shared, generator=None: linear(
            tensors, [p["weight"] for p in per_model], shared["normalize"]
        ),
        needs_base=False,
        per_model={"weight": None},
        shared={"normalize": True},
    ),
    "task_arithmetic": MergeMethod(_ta_family(task_arithmetic, density=False), True, {"weight": None}, _TA_SHARED),
    "ties": MergeMethod(
        _ta_family(ties, True, ("rescale",)),
        True,
        {"weight": None, "density": 1.0},
        {**_TA_SHARED, "normalize": True, "rescale": False},
    ),
    "dare_linear": MergeMethod(
        _ta_family(dare_linear, True, ("rescale",), random=True),
        True,
        {"weight": None, "density": 1.0},
        {**_TA_SHARED, "rescale": True},
        random=True,
    ),
    "dare_ties": MergeMethod(
        _ta_family(dare_ties, True, ("rescale",), random=True),
        True,
        {"weight": None, "density": 1.0},
        {**_TA_SHARED, "rescale": True},
        random=True,
    ),
    "slerp": MergeMethod(
        lambda base, tensors, per_model, shared, generator=None: slerp(base, tensors[0], shared["t"]),
        needs_base=True,
        per_model={},
        shared={"t": None},
        n_models=1,
    ),
}
