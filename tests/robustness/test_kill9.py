"""kill -9 at every write point (issue 15): model, adapter and quantized saves, training checkpoints and their
rotation, and registry push / alias / rollback.

Each trial forks a child that repeats the write (alternating two versions, so every write changes the bytes), and the
parent SIGKILLs it after a random delay. The parent then checks that the destination is the previous complete
version or the new complete one (byte-identical to a reference save, and loadable), that nothing half-written is
visible to a loader, and that the next write succeeds and leaves no temporary folder behind.

Forking keeps a trial to milliseconds (no interpreter start, no imports); the child sets one torch thread so that no
OpenMP pool is used after the fork, and leaves with os._exit. One soak-only test kills a whole `slimlm quantize`
subprocess instead, to cover the command around the save.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import randomize_

from slimlm.config import ModelConfig
from slimlm.model import Transformer

from .conftest import trials

TRIALS = trials(ci=12, soak=300)
# Its own generator: loading a training checkpoint restores the global `random` state, which would replay the same
# kill moments in every trial.
RNG = random.Random()


# --- the harness ---------------------------------------------------------------------------------------------


def kill_during(write: Callable[[int], None], max_delay_s: float) -> tuple[int, bool]:
    """Fork a child running write(0), write(1), ... and SIGKILL it: after 0-2 completed writes (at random), plus a
    random delay in [0, max_delay_s], so kills land in a first write and in later ones, at every moment of a write.

    Returns (writes the child completed, whether it died by the kill: False means it failed on its own)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(r)
            torch.set_num_threads(1)
            for i in range(1 << 30):
                write(i)
                os.write(w, b".")
        finally:
            os._exit(status)
    os.close(w)
    waited = 0
    for _ in range(RNG.randint(0, 2)):
        waited += len(os.read(r, 1))  # b"" once the child is gone
    time.sleep(RNG.uniform(0, max_delay_s))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    done = waited
    while chunk := os.read(r, 1 << 16):
        done += len(chunk)
    os.close(r)
    return done, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def snapshot(path: Path) -> dict[str, str]:
    """A digest of every file under the folder `path`, by relative path: equal snapshots mean equal contents."""
    return {str(f.relative_to(path)): _digest(f) for f in sorted(path.rglob("*")) if f.is_file()}


def _digest(f: Path) -> str:
    """sha256 of a file's bytes; of a safetensors file's tensors and metadata, whose header order varies per save."""
    h = hashlib.sha256()
    if f.suffix != ".safetensors":
        h.update(f.read_bytes())
        return h.hexdigest()
    from safetensors import safe_open

    with safe_open(str(f), "pt") as st:  # raises on a truncated or garbled file
        h.update(repr(sorted((st.metadata() or {}).items())).encode())
        for k in sorted(st.keys()):
            h.update(k.encode() + st.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def holds(check: Callable[[], bool]) -> bool:
    """check(), where an exception (a half-written file that fails to parse) counts as False."""
    try:
        return bool(check())
    except Exception:
        return False


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def tiny(seed: int) -> Transformer:
    config = ModelConfig(**{**ModelConfig.from_name("tiny").to_dict(), "vocab_size": 320})
    torch.manual_seed(seed)
    return randomize_(Transformer(config), seed).eval()


# --- folders written by atomic_folder: model, adapter, quantized model ------------------------------------------


def _hf_writer():
    from slimlm.checkpoint import load_model
    from slimlm.checkpoint.hf import save_hf_folder

    models = [tiny(1), tiny(2)]
    return (lambda i, dest: save_hf_folder(models[i % 2], dest)), (lambda dest: load_model(dest))


def _adapter_writer():
    from slimlm.peft import apply_peft, load_adapter, make_config, save_adapter

    nets = []
    for seed in (1, 2):
        net = tiny(0)
        torch.manual_seed(seed)
        apply_peft(net, "lora", make_config("lora", {"r": 2, "alpha": 4}))
        for _n, p in net.named_parameters():
            if p.requires_grad:  # LoRA B starts at zero: make both versions differ everywhere
                p.data.normal_(0, 0.1)
        nets.append(net)
    return (lambda i, dest: save_adapter(nets[i % 2], dest, base_model="tiny")), (
        lambda dest: load_adapter(tiny(0), dest)
    )


def _quantized_writer():
    from slimlm.checkpoint import load_model
    from slimlm.checkpoint.quantized import save_quantized
    from slimlm.quantize.schemes import quantize_model_

    models = []
    for seed in (1, 2):
        m = tiny(seed)
        quantize_model_(m, "int8")
        models.append(m)
    return (lambda i, dest: save_quantized(models[i % 2], dest)), (lambda dest: load_model(dest))


WRITERS = {"save_hf_folder": _hf_writer, "save_adapter": _adapter_writer, "save_quantized": _quantized_writer}


@pytest.mark.parametrize("point", list(WRITERS))
def test_kill9_during_folder_save(point, tmp_path, record):
    write, load = WRITERS[point]()
    refs = {}
    for i in (0, 1):  # reference bytes of both versions
        write(i, tmp_path / f"ref{i}")
        refs[i] = snapshot(tmp_path / f"ref{i}")
        load(tmp_path / f"ref{i}")
    assert refs[0] != refs[1]
    dest = tmp_path / "work" / "out"
    max_delay = 1.5 * timed(lambda: write(0, dest))
    broken = writes = 0
    for _ in range(TRIALS):
        done, killed = kill_during(lambda i: write(i, dest), max_delay)
        writes += done
        ok = killed and holds(lambda: snapshot(dest) in (refs[0], refs[1]))  # the old folder or the new one
        write(0, dest)  # the next run succeeds, and cleans up what the killed writer left beside dest
        ok = ok and snapshot(dest) == refs[0] and [p.name for p in dest.parent.iterdir()] == ["out"]
        broken += not ok
    load(dest)
    record(kind=f"kill -9: {point}", tried=TRIALS, failures=broken, completed_writes=writes)
    assert broken == 0
    assert writes > 0  # the kills landed between and inside writes, not all before the first one


# --- training checkpoints, with rotation ----------------------------------------------------------------------


def test_kill9_during_checkpoint_save_and_rotation(tmp_path, record):
    from slimlm.train.resume import (
        checkpoint_folder,
        list_checkpoints,
        load_checkpoint,
        remove_partial_checkpoints,
        rotate_checkpoints,
        save_checkpoint,
    )

    def parts(seed: int):
        model = tiny(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        opt.step()  # optimizer state exists, as in a real checkpoint
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    model, opt, sched = parts(1)

    def save(step: int) -> None:
        save_checkpoint(checkpoint_folder(tmp_path, step), model, opt, sched, None, {"step": step})
        rotate_checkpoints(tmp_path, 2)

    save(1)
    max_delay = 1.5 * timed(lambda: save(2))
    broken = writes = 0
    for _ in range(TRIALS):
        newest = list_checkpoints(tmp_path)[-1][0]
        done, killed = kill_during(lambda i, newest=newest: save(newest + 1 + i), max_delay)
        writes += done
        found = list_checkpoints(tmp_path)
        ok = killed and bool(found) and found[-1][0] >= newest
        for step, folder in found:  # every checkpoint a resume could pick is complete
            m2, o2, s2 = parts(0)
            ok = ok and holds(
                lambda folder=folder, m2=m2, o2=o2, s2=s2, step=step: (
                    load_checkpoint(folder, m2, o2, s2, None)["step"] == step
                )
            )
        remove_partial_checkpoints(tmp_path)  # what a resume does first
        save(found[-1][0] + 1 if found else 1)  # the next run
        root = tmp_path / "checkpoints"
        ok = ok and all(not p.name.startswith(".") for p in root.iterdir()) and len(list_checkpoints(tmp_path)) == 2
        broken += not ok
    record(kind="kill -9: training checkpoint + rotation", tried=TRIALS, failures=broken, completed_writes=writes)
    assert broken == 0 and writes > 0


# --- the registry: push, alias, rollback ------------------------------------------------------------------------


def _model_folder(path: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    save_file({"w": torch.full((64, 64), float(seed))}, str(path / "model.safetensors"))
    return path


def _registry_is_consistent(root: Path) -> bool:
    """Every committed version hashes as pushed, every name and alias resolves to one, nothing uncommitted shows."""
    from slimlm.serve.registry import Registry

    reg = Registry(root)  # opening cleans what a killed push left
    try:
        entries = reg.entries()
        for e in entries:
            reg.verify(e)
        for name in reg.names():
            reg.verify(reg.resolve(name))
            for alias in reg.aliases(name):
                reg.verify(reg.resolve(f"{name}@{alias}"))
        on_disk = {(d.parent.name, d.name) for d in (root / "artifacts").glob("*/v*")}
        return on_disk == {(e.name, f"v{e.version}") for e in entries} and not any((root / ".tmp").iterdir())
    finally:
        reg.close()


def test_kill9_during_registry_push_alias_rollback(tmp_path, record):
    from slimlm.serve.registry import Registry

    srcs = [_model_folder(tmp_path / f"m{s}", s) for s in (0, 1)]
    root = tmp_path / "registry"
    reg = Registry(root)
    reg.push("m", srcs[0])
    reg.close()

    def churn(i: int) -> None:
        reg = Registry(root)  # the child's own SQLite connection: one is never shared across a fork
        e = reg.push("m", srcs[i % 2])
        reg.alias(e.ref, "prod")
        if i % 3 == 2:
            reg.rollback("m")

    def once() -> None:
        churn(0)

    max_delay = 1.5 * timed(once)
    broken = writes = 0
    for _ in range(TRIALS):
        done, killed = kill_during(churn, max_delay)
        writes += done
        ok = killed and holds(lambda: _registry_is_consistent(root))
        reg = Registry(root)
        e = reg.push("m", srcs[0])  # the next run
        ok = ok and reg.verify(reg.resolve("m")) == e
        reg.close()
        broken += not ok
    record(kind="kill -9: registry push/alias/rollback", tried=TRIALS, failures=broken, completed_writes=writes)
    assert broken == 0 and writes > 0


# --- a whole command, killed from outside -----------------------------------------------------------------------


@pytest.mark.soak  # each run starts an interpreter (seconds): `make soak` only
def test_kill9_during_cli_quantize(tiny_llama, tmp_path, record):
    """`slimlm quantize --overwrite` in a subprocess, SIGKILLed late in its run (loading done, saving near): the
    previous output stays whole, and the next run of the same command succeeds and leaves nothing beside it."""
    import subprocess
    import sys

    out = tmp_path / "q"
    cmd = [
        sys.executable,
        "-m",
        "slimlm.cli",
        "quantize",
        "--model",
        str(tiny_llama[0]),
        "--scheme",
        "int8",
        "--out",
        str(out),
        "--overwrite",
    ]
    run_s = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
    ref = snapshot(out)
    n, broken = trials(ci=2, soak=12), 0
    for _ in range(n):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(RNG.uniform(0.5, 1.1) * run_s)
        proc.kill()
        proc.wait()
        ok = holds(lambda: snapshot(out) == ref)  # the same command writes the same contents
        ok = ok and subprocess.run(cmd, capture_output=True).returncode == 0  # the next run
        ok = ok and snapshot(out) == ref and [p.name for p in tmp_path.iterdir()] == ["q"]
        broken += not ok
    record(kind="kill -9: slimlm quantize (subprocess)", tried=n, failures=broken)
    assert broken == 0
