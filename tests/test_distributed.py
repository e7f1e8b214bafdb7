"""Fine-tuning on 2 processes (torchrun, CPU gloo, loopback) against 1 process at the same global batch:
train/distributed.py, the distributed paths of train/trainer.py and train/resume.py, `slimlm finetune --nproc`.

Every 2-process run costs a torchrun launch (seconds of imports per rank on a busy 2-core machine), so the
comparisons share ONE launch: this file, run as a script under torchrun (`worker`), fine-tunes each configuration
in turn in the same process group, and the tests compare its outputs with 1-process runs made in-process.
The kill/resume test launches `python -m slimlm finetune --nproc 2` three times (uninterrupted, killed, resumed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SHORT = ["the", "cat", "sat", "on", "the", "mat", "and", "ran", "to", "the", "big", "house"]
TOL = 1e-5  # fp32: 2 processes reassociate sums; nothing else differs
# Global batch 4 x 2 = 8 samples per step; 13 records make micro-batches of 4, 4, 4 and 1 per epoch, so in every
# second step one rank has no sample of the last micro-batch (the stand-in path) and the token counts differ.
BASE = [
    "--train.max_steps",
    "4",
    "--train.batch_size",
    "4",
    "--train.grad_accum",
    "2",
    "--train.lr",
    "1e-3",
    "--dataset.max_seq_len",
    "128",
    "--train.tensorboard",
    "false",
    "-q",
]
# (name, strategy, flags): the must-shows (LoRA and full on DDP and FSDP2), then every other method on DDP,
# and QLoRA on FSDP2 (its NF4 base is buffers: replicated, not sharded).
RUNS = [
    ("lora-ddp", "ddp", ["--method", "lora"]),
    ("lora-fsdp", "fsdp", ["--method", "lora"]),
    ("full-ddp", "ddp", ["--method", "full"]),
    ("full-fsdp", "fsdp", ["--method", "full"]),
    ("dora-ddp", "ddp", ["--method", "lora", "--lora.use_dora", "true"]),
    ("qlora-ddp", "ddp", ["--method", "qlora"]),
    ("qlora-fsdp", "fsdp", ["--method", "qlora"]),
    ("adapter-ddp", "ddp", ["--method", "adapter"]),
    ("bitfit-ddp", "ddp", ["--method", "bitfit"]),
    ("prefix-ddp", "ddp", ["--method", "prefix"]),
    ("prompt-ddp", "ddp", ["--method", "prompt"]),
]
# Distillation: the teacher replicated on each rank; the top-k cache built by rank 0 and read by all (ddp), or
# the teacher run on each rank's share of the batch (fsdp, teacher_cache none).
DISTILL_RUNS = [
    ("distill-topk-ddp", "ddp", ["--teacher-cache", "topk", "--top-k", "32"]),
    ("distill-online-fsdp", "fsdp", ["--teacher-cache", "none"]),
]


def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(SHORT, k=rng.randint(2, 6)))},
                {"role": "assistant", "content": " ".join(rng.choices(SHORT, k=rng.randint(2, 8)))},
            ]
        }
        for _ in range(n)
    ]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _argv(model: Path, data: tuple[Path, Path], out: Path, flags: list[str], *extra: str) -> list[str]:
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data[0]),
        "--eval-data",
        str(data[1]),
        "--out",
        str(out),
        *BASE,
        *flags,
        *extra,
    ]


def _distill_argv(model: Path, data: tuple[Path, Path], out: Path, flags: list[str], *extra: str) -> list[str]:
    return [
        "distill",
        "--teacher",
        str(model),
        "--student-layers",
        "1",
        "--data",
        str(data[0]),
        "--eval-data",
        str(data[1]),
        "--eval-generate",
        "2",
        "--eval-max-new-tokens",
        "4",
        "--out",
        str(out),
        *BASE,
        *flags,
        *extra,
    ]


def _env() -> dict[str, str]:
    # One thread per rank (2 ranks on 2 cores), and no hub access.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _torchrun(*args: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    folder = out / "adapter" if (out / "adapter").is_dir() else out / "model"
    return load_file(str(next(folder.glob("*.safetensors"))))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- the worker: run under torchrun ------------------------------------------------------------------------------


def worker(spec_file: str) -> None:
    """Run every `slimlm finetune` argv of the spec in this process group (rank and world from torchrun)."""
    from slimlm.cli import main

    for argv in json.loads(Path(spec_file).read_text()):
        rc = main(argv)
        if rc != 0:
            raise SystemExit(f"{argv} exited {rc}")


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dist_data")
    return _write_jsonl(folder / "train.jsonl", _records(13, 0)), _write_jsonl(folder / "val.jsonl", _records(4, 1))


@pytest.fixture(scope="module")
def runs(tiny_llama, data, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (1-process OUT, 2-process OUT) for every RUNS entry; the 2-process ones in one torchrun launch.
    The last argv resumes lora-ddp's finished run from its step-2 checkpoint into a copy (`lora-ddp-resumed`)."""
    from slimlm.cli import main

    root = tmp_path_factory.mktemp("dist_runs")
    argvs, outs = [], {}
    for name, strategy, flags in RUNS:
        one, two = root / f"{name}-1", root / f"{name}-2"
        assert main(_argv(tiny_llama[0], data, one, flags)) == 0
        argvs.append(_argv(tiny_llama[0], data, two, flags, "--train.strategy", strategy, "--train.save_every", "2"))
        outs[name] = (one, two)
    for name, strategy, flags in DISTILL_RUNS:
        one, two = root / f"{name}-1", root / f"{name}-2"
        assert main(_distill_argv(tiny_llama[0], data, one, flags)) == 0
        argvs.append(_distill_argv(tiny_llama[0], data, two, flags, "--train.strategy", strategy))
        outs[name] = (one, two)
    spec = root / "spec.json"
    spec.write_text(json.dumps(argvs))
    proc = _torchrun(str(Path(__file__)), "worker", str(spec), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # Exact resume on DDP: rerun the finished lora-ddp run with --resume (it redoes steps 3-4 from the step-2
    # checkpoint: RNG states, data position, optimizer) and compare bit for bit below.
    resumed = root / "lora-ddp-resumed"
    shutil.copytree(outs["lora-ddp"][1], resumed)
    spec.write_text(json.dumps([_argv(tiny_llama[0], data, resumed, RUNS[0][2], "--resume")]))
    proc = _torchrun(str(Path(__file__)), "worker", str(spec), timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    outs["lora-ddp-resumed"] = (outs["lora-ddp"][1], resumed)
    return outs


# --- 2 processes == 1 process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [r[0] for r in RUNS + DISTILL_RUNS])
def test_two_processes_follow_one(runs, name):
    one, two = runs[name]
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2)) < TOL, (l1, l2)
    assert _max_diff(_weights(one), _weights(two)) < TOL
    assert _losses(one)[0] != _losses(one)[-1]  # it trained


@pytest.mark.parametrize("name", ["lora-ddp", "lora-fsdp"])
def test_adapter_loads_in_hf_peft_with_single_process_logits(runs, tiny_llama, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, two = runs[name]
    config = "adapter/adapter_config.json"
    assert (one / config).read_text() == (two / config).read_text()
    ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for out in (one, two):
        base = AutoModelForCausalLM.from_pretrained(
            str(tiny_llama[0]), dtype=torch.float32, attn_implementation="eager"
        )
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, str(out / "adapter")).eval()(ids).logits)
    assert (logits[0] - logits[1]).abs().max().item() < TOL


def test_distill_cache_is_built_once_by_rank0(runs):
    one, two = runs["distill-topk-ddp"]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["cache"]["built_samples"] == json.loads((one / "summary.json").read_text())["cache"]["built_samples"]
    assert (two / "teacher_topk.safetensors").is_file()
    assert set(summary["student_exact_match"]) == {"exact_match", "n"}


def test_only_rank0_writes_and_checkpoints_are_single_process_files(runs):
    _, two = runs["lora-fsdp"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002"]
    ckpt = two / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.pt", "state.json", "trainable.safetensors"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["run"]["step"] == 2
    extra = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(extra["rng_ranks"]) == 2
    # Whole tensors, not shards: the same shapes one process saves.
    one_ckpt = runs["lora-ddp"][1] / "checkpoints" / "step-000002" / "trainable.safetensors"
    assert {k: v.shape for k, v in load_file(str(ckpt / "trainable.safetensors")).items()} == {
        k: v.shape for k, v in load_file(str(one_ckpt)).items()
    }
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 4]  # 4 steps + eval, written once


def test_ddp_resume_is_bit_identical(runs):
    uninterrupted, resumed = runs["lora-ddp-resumed"]
    a, b = _weights(uninterrupted), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(uninterrupted) == _losses(resumed)


def test_resume_with_another_world_size_is_refused(runs, tiny_llama, data, tmp_path, capsys):
    from slimlm.cli import main

    out = tmp_path / "copy"
    shutil.copytree(runs["lora-ddp"][1], out)
    assert main(_argv(tiny_llama[0], data, out, ["--method", "lora"], "--resume")) == 2
    assert "written by a run of 2 process(es); this run has 1" in capsys.readouterr().err


def test_batch_size_must_split_over_the_ranks():
    from slimlm.train.distributed import DistInfo
    from slimlm.train.trainer import TrainConfig, TrainConfigError, _check_distributed

    with pytest.raises(TrainConfigError, match=r"batch_size \(3\) is the global micro-batch.*multiple of 2"):
        _check_distributed(TrainConfig(batch_size=3), DistInfo(rank=0, world_size=2), None)
    with pytest.raises(TrainConfigError, match="strategy must be one of ddp, fsdp"):
        TrainConfig(strategy="zero3").validate()


def test_nproc_checks_the_batch_split_before_launching(tiny_llama, data, tmp_path, capsys):
    from slimlm.cli import main

    argv = _argv(tiny_llama[0], data, tmp_path / "o", ["--method", "lora"], "--train.batch_size", "3", "--nproc", "2")
    assert main(argv) == 2
    assert "--train.batch_size 3 is the global micro-batch, split over 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rank_share_splits_without_overlap_or_loss():
    from slimlm.train.distributed import rank_share

    for n in range(0, 11):
        items = list(range(n))
        for world in (1, 2, 3, 4):
            parts = [rank_share(items, r, world) for r in range(world)]
            assert sum(parts, []) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_nproc_strips_launch_flags():
    from slimlm.train.launch import strip_launch_flags

    argv = ["finetune", "--nproc", "2", "--nnodes=1", "--master-port", "1234", "--out", "x", "--train.lr", "1"]
    assert strip_launch_flags(argv) == ["finetune", "--out", "x", "--train.lr", "1"]


# --- a rank dies: the others stop, the last checkpoint resumes exactly -------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`, read from /proc (Linux)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children + [d for c in children for d in _descendants(c)]


def _workers(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the torchrun workers under `launcher` (read from each process's RANK variable)."""
    found = {}
    for pid in _descendants(launcher.pid):
        try:
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and "slimlm" in cmdline:
            found[int(env["RANK"])] = pid
    return found


def test_sigkill_one_rank_then_resume_is_bit_identical(tiny_llama, data, tmp_path):
    steps = [
        "--train.max_steps",
        "60",
        "--train.save_every",
        "2",
        "--train.strategy",
        "fsdp",
        "--method",
        "lora",
        "--lora.dropout",
        "0.1",
    ]  # dropout: the resume must also restore every rank's RNG state

    def launch(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "slimlm", *_argv(tiny_llama[0], data, out, steps, "--nproc", "2", *extra)]
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    full, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = launch(full)
    victim = launch(killed)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step-000004").is_dir():
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read()[-4000:]
        time.sleep(0.05)
    ranks = _workers(victim)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.monotonic()
    rc = victim.wait(timeout=120)
    exit_s = time.monotonic() - t0
    log = victim.stdout.read()
    assert rc != 0 and exit_s < 60, (rc, exit_s, log[-3000:])
    assert not (killed / "adapter").exists()  # it did not finish
    assert ref.wait(timeout=300) == 0, ref.stdout.read()[-4000:]
    resumed = launch(killed, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-4000:]
    a, b = _weights(full), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(full) == _losses(killed)
    print(f"launcher exited {rc} {exit_s:.1f} s after SIGKILL of rank 1")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2])
