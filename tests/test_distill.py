"""Knowledge distillation: the chunked KD loss against a direct computation (values and gradients, float64), the
top-k teacher cache, the trainer's loss hook, layer-dropped students, and `slimlm distill` end to end.

Models are the tiny random Llama of conftest (vocab 384); every test takes seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from slimlm.cli import main
from slimlm.train.batch import IGNORE, Sample
from slimlm.train.distill import DistillConfig, make_student, online_loss, visited_samples
from slimlm.train.kd_loss import (
    DenseTeacher,
    KDSettings,
    TopKTeacher,
    chunked_kd_loss,
    kd_loss_reference,
    labelled_rows,
)
from slimlm.train.loss import chunked_cross_entropy
from slimlm.train.teacher_cache import TeacherCacheError, build_or_load, read_cache
from slimlm.train.trainer import TrainConfig, train

SHORT = ["the", "cat", "sat", "on", "the", "mat", "and", "ran", "to", "the", "big", "house"]


def _problem(seed: int = 0, B: int = 3, T: int = 9, D: int = 8, V: int = 13, Dt: int = 6):
    """Student hidden [B, T, D] + head, teacher hidden [B, T, Dt] + head, labels with IGNORE; float64."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(D, V, bias=False).double()
    th = torch.randn(B, T, Dt, generator=g, dtype=torch.float64)
    thead = torch.nn.Linear(Dt, V, bias=False).double()
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :4], y[-1, -3:] = IGNORE, IGNORE  # prompt and padding positions
    return h, head, th, thead, y


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_kd_loss_equals_direct_computation_with_gradients(kl, alpha, temperature):
    h, head, th, thead, y = _problem()
    s = KDSettings(alpha, temperature, kl)
    tr, _ = labelled_rows(th, y)
    loss, n = chunked_kd_loss(h, y, head, DenseTeacher(tr, thead), s, chunk_size=4)  # several chunks, one short
    hr, yr = labelled_rows(h, y)
    ref = kd_loss_reference(head(hr), yr, thead(tr), s)
    assert n == int((y != IGNORE).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(loss, h, head.weight), _grads(ref, h, head.weight)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_reference_formula_matches_the_definition_and_temperature_squared():
    g = torch.Generator().manual_seed(1)
    z, t, y = (
        torch.randn(5, 7, generator=g, dtype=torch.float64),
        torch.randn(5, 7, generator=g, dtype=torch.float64),
        torch.arange(5),
    )
    for T in (1.0, 3.0):
        p, q = torch.softmax(z / T, -1), torch.softmax(t / T, -1)
        fwd = (q * (q.log() - p.log())).sum()
        rev = (p * (p.log() - q.log())).sum()
        torch.testing.assert_close(kd_loss_reference(z, y, t, KDSettings(1.0, T, "forward")), T * T * fwd)
        torch.testing.assert_close(kd_loss_reference(z, y, t, KDSettings(1.0, T, "reverse")), T * T * rev)


def test_gradcheck_of_the_fused_function():
    h, head, th, thead, y = _problem(B=2, T=5, V=7)
    tr, _ = labelled_rows(th, y)
    for kl in ("forward", "reverse"):
        teacher, s = DenseTeacher(tr, thead), KDSettings(0.3, 1.7, kl)
        assert torch.autograd.gradcheck(
            lambda hh, w, teacher=teacher, s=s: chunked_kd_loss(hh, y, _Head(w), teacher, s, 3)[0], (h, head.weight)
        )


class _Head(torch.nn.Linear):
    """A bias-free Linear whose weight is the given tensor (so gradcheck can perturb it)."""

    def __init__(self, w):
        torch.nn.Module.__init__(self)
        self.weight, self.bias = w, None


def test_alpha_zero_equals_train_loss_cross_entropy():
    h, head, th, thead, y = _problem()
    h32, head32 = h.detach().float().requires_grad_(), head.float()
    tr, _ = labelled_rows(th.float(), y)
    kd, n = chunked_kd_loss(h32, y, head32, DenseTeacher(tr, thead.float()), KDSettings(0.0, 2.0), chunk_size=5)
    ce, m = chunked_cross_entropy(h32, y, head32, chunk_size=5)
    assert n == m
    torch.testing.assert_close(kd, ce)
    torch.testing.assert_close(_grads(kd, h32)[0], _grads(ce, h32)[0])


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_topk_teacher_with_k_equal_vocab_equals_on_the_fly(kl):
    h, head, th, thead, y = _problem()
    tr, _ = labelled_rows(th, y)
    s = KDSettings(0.7, 2.0, kl)
    dense, _ = chunked_kd_loss(h, y, head, DenseTeacher(tr, thead), s, chunk_size=4)
    logp, ids = torch.log_softmax(thead(tr), -1).topk(13, -1)  # k = V, in top-k order
    topk, _ = chunked_kd_loss(h, y, head, TopKTeacher(logp, ids), s, chunk_size=4)
    torch.testing.assert_close(topk, dense)
    torch.testing.assert_close(_grads(topk, h)[0], _grads(dense, h)[0])
    # k < V: equals the direct formula over the k ids, both distributions renormalised there
    logp, ids = torch.log_softmax(thead(tr), -1).topk(4, -1)
    topk, _ = chunked_kd_loss(h, y, head, TopKTeacher(logp, ids), s, chunk_size=4)
    hr, yr = labelled_rows(h, y)
    ref = kd_loss_reference(head(hr), yr, logp, s, ids)
    torch.testing.assert_close(topk, ref)
    torch.testing.assert_close(_grads(topk, h)[0], _grads(ref, h)[0])


def test_non_linear_head_falls_back_to_checkpointed_reference():
    h, head, th, thead, y = _problem()
    tr, _ = labelled_rows(th, y)
    s = KDSettings(0.5, 2.0, "reverse")
    wrapped = torch.nn.Sequential(head)  # not an nn.Linear: the generic path
    a, _ = chunked_kd_loss(h, y, wrapped, DenseTeacher(tr, thead), s, chunk_size=4)
    b, _ = chunked_kd_loss(h, y, head, DenseTeacher(tr, thead), s, chunk_size=4)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(_grads(a, h)[0], _grads(b, h)[0])


def test_teacher_rows_must_match_labelled_positions():
    h, head, th, thead, y = _problem()
    with pytest.raises(ValueError, match="teacher has 5 rows but the batch has"):
        chunked_kd_loss(h, y, head, DenseTeacher(th.reshape(-1, 6)[:5], thead), KDSettings())


# --- models, cache, trainer hook ----------------------------------------------------------------------------------


def _samples(n: int, seed: int, vocab: int = 384) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(6, 14))]
        p = rng.randint(2, len(ids) - 3)
        out.append(Sample(ids, [IGNORE] * p + ids[p + 1 :] + [IGNORE]))
    return out


@pytest.fixture(scope="module")
def teacher(tiny_llama):
    from slimlm.checkpoint import load_model

    model = load_model(tiny_llama[0])[2]
    return model.eval().requires_grad_(False)


def _deeper_teacher(seed: int = 3):
    from slimlm.config import ModelConfig
    from slimlm.model import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=384, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64)
    return Transformer(cfg).eval().requires_grad_(False)


def test_cache_round_trips_and_refuses_other_teacher_or_data(teacher, tmp_path):
    samples, path = _samples(10, 0), tmp_path / "c.safetensors"
    cache, built = build_or_load(path, teacher, samples, [1, 3, 5], 16, "teacher-A", batch_size=2)
    assert built == 3 and path.is_file()
    again, built = build_or_load(path, teacher, samples, [5, 1], 16, "teacher-A")
    assert built == 0
    for a, b in ((cache.values, again.values), (cache.ids, again.ids), (cache.offsets, again.offsets)):
        assert torch.equal(a, b)
    more, built = build_or_load(path, teacher, samples, [0, 1, 9], 16, "teacher-A")  # extends the file
    assert built == 2 and sorted(read_cache(path).sample_index.tolist()) == [0, 1, 3, 5, 9]
    # the rows equal a direct top-k of the teacher's log-probs at the labelled positions of sample 3
    s3 = samples[3]
    with torch.no_grad():
        logp = torch.log_softmax(teacher(torch.tensor([s3.input_ids]))[0].float(), -1)
    keep = torch.tensor([i for i, t in enumerate(s3.labels) if t != IGNORE])
    v, j = logp[keep].topk(16, -1)
    got = more.lookup([3])
    torch.testing.assert_close(got.logp, v, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.ids, j.long())
    with pytest.raises(TeacherCacheError, match="different teacher"):
        build_or_load(path, teacher, samples, [1], 16, "teacher-B")
    with pytest.raises(TeacherCacheError, match="different data_sha256"):
        build_or_load(path, teacher, _samples(10, 1), [1], 16, "teacher-A")
    with pytest.raises(TeacherCacheError, match="different top_k"):
        build_or_load(path, teacher, samples, [1], 8, "teacher-A")


def test_default_trainer_path_ignores_sample_index_and_loss_hook_gets_it(teacher, tmp_path):
    seen = []

    def loss_fn(model, batch):
        seen.append(batch["sample_index"].tolist())
        h = model.hidden(batch["input_ids"])
        return chunked_cross_entropy(h, batch["labels"], model.lm_head)

    samples = _samples(6, 2)
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-3)
    stud_a = make_student(_cfg(student_layers=1), teacher, torch.device("cpu"))
    stud_b = make_student(_cfg(student_layers=1), teacher, torch.device("cpu"))
    ra = train(stud_a, samples, cfg, tmp_path / "a", progress=False)
    rb = train(stud_b, samples, cfg, tmp_path / "b", progress=False, loss_fn=loss_fn)
    assert ra.final_loss == rb.final_loss  # the hook computing the default loss changes nothing
    assert len(seen) == 3 and all(len(s) == 2 for s in seen)
    assert sorted(sum(seen, [])) == visited_samples(6, cfg)


def _cfg(**kw) -> DistillConfig:
    return DistillConfig(**{"teacher": "unused", "data": __file__, **kw})


def test_drop_layers_student_trains_and_loss_falls(tmp_path):
    teacher = _deeper_teacher()
    student = make_student(_cfg(student_layers=2), teacher, torch.device("cpu"))
    assert student.config.n_layers == 2 and all(p.requires_grad for p in student.parameters())
    samples = _samples(4, 3)
    res = train(
        student,
        samples,
        TrainConfig(max_steps=30, batch_size=4, lr=3e-3),
        tmp_path,
        progress=False,
        loss_fn=online_loss(teacher, KDSettings(0.0, 1.0), 64),
    )  # memorise the labels
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert res.steps == 30 and losses[-1] < 0.7 * losses[0]


@torch.no_grad()
def _mean_kl(teacher, student, samples) -> float:
    from slimlm.train.batch import collate

    b = collate(samples, 0)
    lt = torch.log_softmax(teacher(b["input_ids"]), -1)
    ls = torch.log_softmax(student(b["input_ids"]), -1)
    mask = b["labels"] != IGNORE
    return float((lt.exp() * (lt - ls)).sum(-1)[mask].mean())


@pytest.mark.parametrize("cache", ["none", "topk"])
def test_distilled_student_moves_toward_teacher(cache, tmp_path):
    from slimlm.train.distill import cached_loss
    from slimlm.train.teacher_cache import build_or_load

    teacher = _deeper_teacher()
    student = _random_student()
    samples = _samples(8, 4)
    before = _mean_kl(teacher, student, samples)
    s = KDSettings(1.0, 1.0, "forward")
    cfg = TrainConfig(max_steps=40, batch_size=4, lr=3e-3)
    if cache == "none":
        loss_fn = online_loss(teacher, s, 64)
    else:
        c, _ = build_or_load(tmp_path / "c.safetensors", teacher, samples, range(8), 384, "t")
        loss_fn = cached_loss(c, s, 64)
    train(student, samples, cfg, tmp_path / "run", progress=False, loss_fn=loss_fn)
    after = _mean_kl(teacher, student.eval(), samples)
    assert after < 0.5 * before


def _random_student():
    from slimlm.config import ModelConfig
    from slimlm.model import Transformer

    torch.manual_seed(7)
    cfg = ModelConfig(vocab_size=384, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=32, max_seq_len=64)
    return Transformer(cfg).train()


# --- config and CLI -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"kl": "sideways"}, "kl must be one of forward, reverse"),
        ({"teacher_cache": "disk"}, "teacher_cache must be one of none, topk"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"student": None, "student_layers": None}, "no student: pass --student"),
        ({"student_layers": 0}, "student_layers must be a positive integer"),
        ({"student": "some/folder", "student_layers": 3}, "student_layers applies to the teacher or a preset"),
        ({"data": "missing.jsonl"}, "training data missing.jsonl does not exist"),
        ({"eval_generate": 5}, "eval_generate needs --eval-data"),
        ({"train": TrainConfig(lr=-1)}, "lr must be a positive number"),
    ],
)
def test_bad_configs_raise(kw, match):
    cfg = _cfg(**{"student_layers": 1, **kw})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def _write_chat(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    recs = [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(SHORT, k=4))},
                {"role": "assistant", "content": " ".join(rng.choices(SHORT, k=5))},
            ]
        }
        for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("cache", ["none", "topk"])
def test_cli_end_to_end_writes_a_loadable_student(tiny_llama, tmp_path, cache):
    import slimlm

    train_file, val_file = _write_chat(tmp_path / "train.jsonl", 8, 0), _write_chat(tmp_path / "val.jsonl", 3, 1)
    out = tmp_path / "run"
    argv = [
        "distill",
        "--teacher",
        str(tiny_llama[0]),
        "--student-layers",
        "1",
        "--data",
        str(train_file),
        "--eval-data",
        str(val_file),
        "--eval-generate",
        "2",
        "--eval-max-new-tokens",
        "8",
        "--out",
        str(out),
        "--teacher-cache",
        cache,
        "--top-k",
        "32",
        "--train.max_steps",
        "3",
        "--train.batch_size",
        "4",
        "--dataset.max_seq_len",
        "64",
        "-q",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["student_params"] < summary["teacher_params"]
    assert set(summary["teacher_exact_match"]) == {"exact_match", "n"}
    if cache == "topk":
        assert summary["cache"]["built_samples"] > 0 and (out / "teacher_topk.safetensors").is_file()
    llm = slimlm.load(str(out / "model"), dtype="fp32")
    assert llm.model.config.n_layers == 1
    assert isinstance(llm.generate("the cat", max_new_tokens=3), str)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((out / "recipe.yaml").read_text().replace(f"out: {out}", f"out: {tmp_path / 'run2'}"))
    assert main(["distill", str(recipe), "--alpha", "0", "-q"]) == 0  # hard labels only, from the YAML recipe
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["alpha"] == 0.0


def test_cli_bad_flag_exits_2(tiny_llama, tmp_path, capsys):
    train_file = _write_chat(tmp_path / "train.jsonl", 4, 0)
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(tiny_llama[0]),
                "--student-layers",
                "1",
                "--data",
                str(train_file),
                "--kl",
                "both",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "kl must be one of forward, reverse" in capsys.readouterr().err
