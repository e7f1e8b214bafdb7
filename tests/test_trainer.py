"""train/trainer.py and train/resume.py: the loop, its numerics, its logs, and resuming bit-identically."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_run import KILL_AT, RESUME_CONFIGS, make_samples, tiny_model

from slimlm.train.batch import IGNORE, Sample, collate
from slimlm.train.loss import chunked_cross_entropy
from slimlm.train.resume import ResumeError, list_checkpoints
from slimlm.train.trainer import (
    SampleStream,
    TrainConfig,
    TrainConfigError,
    accumulate_gradients,
    evaluate,
    lr_factor,
    make_optimizer,
    train,
)

FAST = dict(lr=1e-3, batch_size=4, max_steps=3)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def tensorboard_scalars(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file in OUT/tensorboard, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    """A metrics.jsonl number as a TensorBoard scalar holds it (float32)."""
    return float(np.float32(x))


# ---- config ------------------------------------------------------------------------------------------------------


def test_config_validation_names_every_problem():
    cfg = TrainConfig(
        max_steps=0,
        batch_size=-1,
        lr=0,
        betas=(0.9, 1.5),
        precision="fp8",
        warmup_steps=-2,
        min_lr_ratio=2.0,
        keep_checkpoints=0,
    )
    with pytest.raises(TrainConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    for part in (
        "max_steps must be a positive integer",
        "batch_size must be a positive integer",
        "lr must be a positive number",
        "betas must be two numbers in [0, 1)",
        "precision must be one of fp32, bf16, fp16",
        "warmup_steps must be an integer >= 0",
        "min_lr_ratio must be in [0, 1]",
        "keep_checkpoints must be a positive integer",
    ):
        assert part in msg
    with pytest.raises(TrainConfigError, match=r"warmup_steps \(20\) must not exceed max_steps \(10\)"):
        TrainConfig(max_steps=10, warmup_steps=20).validate()
    TrainConfig().validate()  # the defaults are valid


def test_fp16_on_cpu_raises(tmp_path):
    with pytest.raises(TrainConfigError, match="'fp16' needs a CUDA device.*use precision 'bf16' or 'fp32'"):
        train(tiny_model(), make_samples(4), TrainConfig(precision="fp16", **FAST), tmp_path, progress=False)


def test_bad_inputs_raise_clear_errors(tmp_path):
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        train(frozen, make_samples(4), TrainConfig(**FAST), tmp_path, progress=False)
    packed = [Sample([5, 6, 7], [6, 7, IGNORE], segment_ids=[0, 0, 1])]
    with pytest.raises(ValueError, match="packing with prompt tuning is unsupported"):
        train(tiny_model(), packed, TrainConfig(**FAST), tmp_path, input_prefix_ids=[1, 2], progress=False)
    no_labels = [Sample([5, 6, 7], [IGNORE] * 3)]
    with pytest.raises(ValueError, match="no train sample has a labelled token"):
        train(tiny_model(), no_labels, TrainConfig(**FAST), tmp_path, progress=False)


# ---- schedule, optimizer, data order -----------------------------------------------------------------------------


def test_warmup_cosine_lr():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(3)] == [0.5, 1.0, 1.0]  # warmup reaches full LR at its last step
    mid = lr_factor(6, cfg)  # halfway through the cosine (steps 2..10)
    assert math.isclose(mid, 0.1 + 0.9 * 0.5)
    assert math.isclose(lr_factor(10, cfg), 0.1)  # min_lr_ratio * lr at max_steps
    factors = [lr_factor(s, cfg) for s in range(2, 11)]
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert lr_factor(0, TrainConfig(max_steps=5)) == 1.0  # no warmup: start at full LR


def test_logged_lr_follows_schedule(tmp_path):
    cfg = TrainConfig(max_steps=6, warmup_steps=2, min_lr_ratio=0.2, lr=1e-3, batch_size=4)
    train(tiny_model(), make_samples(8), cfg, tmp_path, progress=False)
    lrs = [m["lr"] for m in read_metrics(tmp_path / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3 * lr_factor(s, cfg) for s in range(6)])


def test_no_weight_decay_on_1d_params():
    model = tiny_model(attention_bias=True)
    params = dict(model.named_parameters())
    optimizer, _ = make_optimizer(params, TrainConfig(weight_decay=0.1))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(params["layers.0.self_attn.q_proj.weight"]) in decay
    for name in ("layers.0.self_attn.q_proj.bias", "layers.0.input_layernorm.weight", "norm.weight"):
        assert id(params[name]) not in decay


def test_sample_stream_is_a_function_of_seed_epoch_position():
    samples = make_samples(10)
    stream = SampleStream(samples, batch_size=4, seed=3)
    batches = [stream.next() for _ in range(7)]
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]  # the short last batch of each epoch is kept
    first_epoch = [id(s) for b in batches[:3] for s in b]
    assert sorted(first_epoch) == sorted(id(s) for s in samples)  # each sample once per epoch
    assert first_epoch != [id(s) for b in batches[3:6] for s in b]  # a new order per epoch
    # Restarting from (epoch 1, position 4) gives exactly the rest of the stream.
    resumed = SampleStream(samples, batch_size=4, seed=3, epoch=1, position=4)
    assert [[id(s) for s in resumed.next()] for _ in range(3)] == [[id(s) for s in b] for b in batches[4:7]]


# ---- numerics ----------------------------------------------------------------------------------------------------


def test_grad_accumulation_equals_one_big_batch():
    samples = make_samples(8, lengths=(4, 16))  # unequal trained tokens per micro-batch: normalisation matters
    grads = []
    for batches in ([collate(samples, 0)], [collate(samples[:4], 0), collate(samples[4:], 0)]):
        model = tiny_model()
        stats = accumulate_gradients(model, batches, TrainConfig())
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, stats))
    (big, big_stats), (acc, acc_stats) = grads
    assert big_stats.trained_tokens == acc_stats.trained_tokens == sum(s.num_trained for s in samples)
    assert acc_stats.loss == pytest.approx(big_stats.loss, abs=1e-6)
    for n in big:
        torch.testing.assert_close(acc[n], big[n], atol=1e-6, rtol=0, msg=n)


def test_grad_accumulation_in_train_matches_one_big_batch(tmp_path):
    samples = make_samples(8, lengths=(4, 16))
    weights, logs = [], []
    for bs, accum in ((8, 1), (4, 2)):  # same seed: the same 8 samples make the first step either way
        model = tiny_model()
        train(
            model,
            samples,
            TrainConfig(max_steps=1, batch_size=bs, grad_accum=accum, lr=1e-3),
            tmp_path / f"b{bs}",
            progress=False,
        )
        weights.append(snapshot(model))
        logs.append(read_metrics(tmp_path / f"b{bs}" / "metrics.jsonl")[0])
    assert logs[1]["tokens"] == logs[0]["tokens"]
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], abs=1e-6)
    assert logs[1]["grad_norm"] == pytest.approx(logs[0]["grad_norm"], abs=1e-6)
    # Adam's first update is ~lr * g / (|g| + eps): for the odd element with |g| near eps, float-rounding
    # differences in g (padding to other lengths changes the matmul shapes) move it by up to ~lr. The gradients
    # themselves agree to 1e-6 (test above); here the weights agree far below lr.
    for n in weights[0]:
        torch.testing.assert_close(weights[1][n], weights[0][n], atol=1e-4, rtol=0, msg=n)


def test_loss_decreases_on_memorisation_set(tmp_path):
    samples = make_samples(4, seed=2)
    result = train(
        tiny_model(),
        samples,
        TrainConfig(max_steps=20, batch_size=4, lr=3e-3),
        tmp_path,
        eval_samples=samples,
        progress=False,
    )
    losses = [m["loss"] for m in read_metrics(result.metrics_path) if "loss" in m]
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0]
    assert result.final_loss == losses[-1]
    assert result.eval_metrics["eval_loss"] < 0.5 * losses[0]


def test_only_trainable_params_change(tmp_path):
    model = tiny_model()
    model.requires_grad_(False)
    trainable = {"layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight", "norm.weight"}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    before = snapshot(model)
    train(model, make_samples(8), TrainConfig(weight_decay=0.1, **FAST), tmp_path, progress=False)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
            assert p.grad is None


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    weights = []
    for gc in (False, True):
        model = tiny_model()
        train(
            model, make_samples(8), TrainConfig(gradient_checkpointing=gc, **FAST), tmp_path / str(gc), progress=False
        )
        assert model.gradient_checkpointing is False  # the switch is restored after training
        weights.append(snapshot(model))
    for n in weights[0]:
        torch.testing.assert_close(weights[1][n], weights[0][n], atol=1e-6, rtol=0)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    model = tiny_model()
    result = train(
        model,
        make_samples(8),
        TrainConfig(precision="bf16", **FAST),
        tmp_path,
        eval_samples=make_samples(3, seed=5),
        progress=False,
    )
    assert math.isfinite(result.final_loss) and math.isfinite(result.eval_metrics["eval_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_evaluate_matches_full_logits_loss():
    model = tiny_model().eval()
    samples = make_samples(5, seed=4)
    b = collate(samples, 0)
    with torch.no_grad():
        logits = model(b["input_ids"])
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE)
    assert evaluate(model, samples, TrainConfig(batch_size=2, loss_chunk_size=7)) == pytest.approx(ref.item(), abs=1e-5)


def test_input_prefix_ids_are_prepended_without_loss(tmp_path):
    samples = make_samples(4)
    seen = []
    model = tiny_model()
    hidden = model.hidden
    model.hidden = lambda ids, segment_ids=None: (seen.append(ids.clone()), hidden(ids, segment_ids=segment_ids))[1]
    result = train(
        model, samples, TrainConfig(max_steps=1, batch_size=4), tmp_path, input_prefix_ids=[1, 2], progress=False
    )
    assert (seen[0][:, :2] == torch.tensor([1, 2])).all()
    assert result.trained_tokens == sum(s.num_trained for s in samples)  # the prefix takes no loss


# ---- logs and checkpoints ----------------------------------------------------------------------------------------


def test_metrics_jsonl_content(tmp_path):
    samples = make_samples(8)
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        return {"accuracy": 0.5}

    cfg = TrainConfig(max_steps=4, batch_size=8, log_every=2, eval_every=2, lr=1e-3)  # one step = one epoch
    result = train(tiny_model(), samples, cfg, tmp_path, eval_samples=samples[:3], eval_fn=eval_fn, progress=False)
    lines = read_metrics(tmp_path / "metrics.jsonl")
    logs = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in logs] == [2, 4] and [m["step"] for m in evals] == [2, 4]  # no extra eval at the end
    trained = sum(s.num_trained for s in samples)
    for m in logs:
        assert set(m) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}
        assert m["epoch"] == m["step"]  # one step = one epoch: epochs done so far
        assert m["tokens"] == trained  # the step's trained tokens (prompts excluded)
        assert m["tokens_per_s"] > 0 and m["grad_norm"] > 0 and m["elapsed_s"] > 0
    assert evals[-1]["accuracy"] == 0.5 and calls == [False, False]  # eval_fn sees eval mode
    assert result.eval_metrics == {k: v for k, v in evals[-1].items() if k != "step"}
    assert result.steps == 4 and result.trained_tokens == 4 * trained
    assert result.tokens_per_s > 0 and result.metrics_path == tmp_path / "metrics.jsonl"


def test_checkpoint_rotation_and_contents(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    model.layers[1].requires_grad_(False)
    train(
        model,
        make_samples(8),
        TrainConfig(max_steps=5, save_every=1, keep_checkpoints=2, batch_size=4),
        tmp_path,
        progress=False,
    )
    found = list_checkpoints(tmp_path)
    assert [s for s, _ in found] == [3, 4]  # newest two; none at the end (step 5): the caller saves the result
    folder = found[-1][1]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = load_file(str(folder / "trainable.safetensors"))
    assert set(saved) == trainable and "lm_head.weight" not in saved  # tied head: saved once, as the embedding
    extra = torch.load(folder / "optimizer.pt", weights_only=True)  # no full unpickling needed
    assert set(extra) == {"optimizer", "scheduler", "rng", "scaler"}
    state = json.loads((folder / "state.json").read_text())
    assert state["run"]["step"] == 4 and state["config"]["save_every"] == 1


def test_resume_rejects_other_trainable_params(tmp_path):
    model = tiny_model()
    train(model, make_samples(8), TrainConfig(max_steps=3, save_every=2, batch_size=4), tmp_path, progress=False)
    other = tiny_model()
    other.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(ResumeError, match="not trainable in the model: embed_tokens.weight.*same model, PEFT method"):
        train(other, make_samples(8), TrainConfig(max_steps=3, batch_size=4), tmp_path, resume=True, progress=False)
    with pytest.raises(ResumeError, match="holds checkpoints of an earlier run.*pass resume=True"):
        train(tiny_model(), make_samples(8), TrainConfig(max_steps=3), tmp_path, progress=False)


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    result = train(tiny_model(), make_samples(4), TrainConfig(**FAST), tmp_path, resume=True, progress=False)
    assert result.steps == 3
    assert "starting a fresh run" in capsys.readouterr().err


def run_script(out_dir: Path, mode: str, weights: Path, config: str = "steps") -> subprocess.Popen:
    script = Path(__file__).with_name("train_run.py")
    return subprocess.Popen(
        [sys.executable, str(script), str(out_dir), mode, str(weights), config],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("config", ["steps", "epochs"])  # resumed at an epoch's end / in the middle of one
def test_sigkill_then_resume_is_bit_identical(tmp_path, config):
    full_w, resumed_w = tmp_path / "full.safetensors", tmp_path / "resumed.safetensors"
    # The uninterrupted run and the run that is killed, side by side.
    full = run_script(tmp_path / "full", "full", full_w, config)
    killed = run_script(tmp_path / "run", "kill", resumed_w, config)
    out_full, out_killed = full.communicate(timeout=120)[0], killed.communicate(timeout=120)[0]
    assert full.returncode == 0, out_full
    assert killed.returncode == -9, out_killed  # SIGKILL: no cleanup code ran
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(1, KILL_AT + 1))
    # A checkpoint being written when the process died: a temporary folder, which resume must ignore.
    partial = run / "checkpoints" / ".step-000004.tmp-abc123"
    partial.mkdir()
    (partial / "state.json").write_text("{not json")

    resumed = run_script(run, "resume", resumed_w, config)
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "step 2" in out
    assert not partial.exists()
    full_params, resumed_params = load_file(str(full_w)), load_file(str(resumed_w))
    assert set(full_params) == set(resumed_params) and "embed_tokens.weight" not in full_params
    for n in full_params:
        assert torch.equal(full_params[n], resumed_params[n]), f"{n} differs after resume"
    # The metrics of the killed step 3 are replaced, not duplicated; the log equals the uninterrupted one.
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    full_metrics = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [m["loss"] for m in metrics] == [m["loss"] for m in full_metrics]
    assert [m["epoch"] for m in metrics] == [m["epoch"] for m in full_metrics]
    if config == "epochs":  # 5 micro-batches of 2 per epoch: steps read 4, 4, 2 samples of it
        assert TrainConfig(**RESUME_CONFIGS[config]).total_steps(10) == 6
        assert [m["epoch"] for m in metrics] == [0.4, 0.8, 1.0, 1.4, 1.8, 2.0]
    # TensorBoard hides the killed run's step 3 (purge_step): its scalars equal the rewritten metrics.jsonl.
    assert tensorboard_scalars(run)["train/loss"] == [(m["step"], f32(m["loss"])) for m in metrics]


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_trains_and_resumes(tmp_path, precision):
    cfg = TrainConfig(precision=precision, max_steps=4, save_every=2, batch_size=4, lr=1e-3)
    result = train(tiny_model().cuda(), make_samples(8), cfg, tmp_path, progress=False)
    assert math.isfinite(result.final_loss)
    extra = torch.load(tmp_path / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    assert "cuda" in extra["rng"]
    assert (extra["scaler"]["scale"] > 0) if precision == "fp16" else extra["scaler"] is None
    resumed = train(tiny_model().cuda(), make_samples(8), cfg, tmp_path, resume=True, progress=False)
    assert resumed.steps == 4 and math.isfinite(resumed.final_loss)


def test_resume_warns_about_changed_settings(tmp_path):
    train(
        tiny_model(),
        make_samples(8),
        TrainConfig(max_steps=3, save_every=2, batch_size=4, lr=1e-3),
        tmp_path,
        progress=False,
    )
    with pytest.warns(UserWarning, match=r"lr: 0.001 -> 0.002.*will not match an uninterrupted one"):
        train(
            tiny_model(),
            make_samples(8),
            TrainConfig(max_steps=3, save_every=1, batch_size=4, lr=2e-3),
            tmp_path,
            resume=True,
            progress=False,
        )  # save_every is bookkeeping: not named


# ---- epochs ------------------------------------------------------------------------------------------------------


def test_num_epochs_or_max_steps_not_both():
    with pytest.raises(TrainConfigError, match=r"max_steps \(5\) and num_epochs \(2\) are both set; set one"):
        TrainConfig(max_steps=5, num_epochs=2).validate()
    with pytest.raises(TrainConfigError, match="num_epochs must be a positive integer, got 0"):
        TrainConfig(num_epochs=0).validate()
    assert TrainConfig().total_steps(1000) == 100  # neither set: the old default of 100 steps
    assert TrainConfig(max_steps=7).total_steps(1000) == 7
    # 10 samples, micro-batches of 3: 4 per epoch (3, 3, 3, 1); two per step -> 2 steps per epoch
    assert TrainConfig(num_epochs=3, batch_size=3, grad_accum=2).total_steps(10) == 6
    assert TrainConfig(num_epochs=1, batch_size=4, grad_accum=3).total_steps(8) == 1  # a step never spans epochs
    with pytest.raises(TrainConfigError, match=r"warmup_steps \(5\) exceeds the run's 4 steps \(2 epochs of 2\)"):
        train(
            tiny_model(),
            make_samples(8),
            TrainConfig(num_epochs=2, batch_size=4, warmup_steps=5),
            Path("unused"),
            progress=False,
        )


def test_sample_stream_steps_stop_at_the_end_of_an_epoch():
    stream = SampleStream(list(range(10)), batch_size=3, seed=1)
    steps = [stream.next_step(3) for _ in range(4)]
    assert [[len(idx) for idx, _ in step] for step in steps] == [[3, 3, 3], [1], [3, 3, 3], [1]]
    assert sorted(i for step in steps[:2] for idx, _ in step for i in idx) == list(range(10))
    assert stream.epochs_done == 2.0


def test_num_epochs_visits_every_sample_once_per_epoch_in_a_new_seeded_order(tmp_path):
    def run(seed: int, out: str) -> tuple[list[list[int]], list[dict]]:
        seen = []

        def loss_fn(model, batch):  # the default loss, recording which samples each micro-batch held
            seen.append(batch["sample_index"].tolist())
            return chunked_cross_entropy(model.hidden(batch["input_ids"]), batch["labels"], model.lm_head)

        cfg = TrainConfig(num_epochs=3, batch_size=3, grad_accum=2, lr=1e-3, warmup_steps=1, seed=seed)
        result = train(tiny_model(), make_samples(10), cfg, tmp_path / out, progress=False, loss_fn=loss_fn)
        assert result.steps == 6
        return seen, read_metrics(tmp_path / out / "metrics.jsonl")

    seen, metrics = run(0, "a")
    epochs = [sum(seen[i : i + 4], []) for i in (0, 4, 8)]  # 4 micro-batches per epoch
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    assert [m["epoch"] for m in metrics] == [0.6, 1.0, 1.6, 2.0, 2.6, 3.0]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    cfg = TrainConfig(num_epochs=3, batch_size=3, grad_accum=2, lr=1e-3, warmup_steps=1)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3 * lr_factor(s, cfg, 6) for s in range(6)])
    assert run(0, "b")[0] == seen and run(1, "c")[0] != seen  # the order is a function of the seed


# ---- TensorBoard -------------------------------------------------------------------------------------------------


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    samples = make_samples(8)
    cfg = TrainConfig(max_steps=4, batch_size=4, log_every=1, eval_every=2, lr=1e-3)
    train(
        tiny_model(),
        samples,
        cfg,
        tmp_path,
        eval_samples=samples[:3],
        eval_fn=lambda m: {"accuracy": 0.25},
        progress=False,
    )
    scalars = tensorboard_scalars(tmp_path)
    lines = read_metrics(tmp_path / "metrics.jsonl")
    logs, evals = [m for m in lines if "loss" in m], [m for m in lines if "eval_loss" in m]
    expected = {f"train/{k}": [(m["step"], f32(m[k])) for m in logs] for k in logs[0] if k != "step"}
    expected |= {
        "eval/loss": [(m["step"], f32(m["eval_loss"])) for m in evals],
        "eval/accuracy": [(m["step"], 0.25) for m in evals],
    }
    assert scalars == expected
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/epoch"} <= set(scalars)


def test_tensorboard_is_flushed_on_error_and_purged_on_resume(tmp_path):
    def fail(step: int) -> None:
        if step == 3:
            raise RuntimeError("stop")

    cfg = TrainConfig(max_steps=4, batch_size=4, save_every=2, lr=1e-3)
    with pytest.raises(RuntimeError, match="stop"):
        train(tiny_model(), make_samples(8), cfg, tmp_path / "a", progress=False, on_step_end=fail)
    assert [s for s, _ in tensorboard_scalars(tmp_path / "a")["train/loss"]] == [1, 2, 3]  # flushed on the error
    train(tiny_model(), make_samples(8), cfg, tmp_path / "a", resume=True, progress=False)  # from step 2
    metrics = read_metrics(tmp_path / "a" / "metrics.jsonl")
    # step 3 of the failed run is hidden, not shown beside the resumed run's step 3
    assert tensorboard_scalars(tmp_path / "a")["train/loss"] == [(m["step"], f32(m["loss"])) for m in metrics]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_tensorboard_can_be_turned_off(tmp_path):
    train(
        tiny_model(),
        make_samples(8),
        TrainConfig(max_steps=2, batch_size=4, tensorboard=False),
        tmp_path / "b",
        progress=False,
    )  # and it is bookkeeping: a resume may switch it without a warning
    assert (tmp_path / "b" / "metrics.jsonl").is_file() and not (tmp_path / "b" / "tensorboard").exists()
