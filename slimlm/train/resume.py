"""Training checkpoints: everything needed to resume a run so that it ends bit-identical to an uninterrupted one.

A checkpoint is a folder `out_dir/checkpoints/step-{N:06d}` written atomically (checkpoint/atomic.py), holding

    trainable.safetensors  every parameter with requires_grad, by its `named_parameters()` name (tied ones once)
    optimizer.pt           optimizer, LR scheduler and GradScaler state, and the torch / CUDA / python RNG states
    state.json             step, data position (epoch, position), token counts, elapsed time, the config

Only trainable parameters are saved: the frozen base model is the caller's to reload. Several processes
(train/distributed.py) write the same files one process writes, once, from rank 0: FSDP2 shards are gathered whole
first (parameters and optimizer state), and optimizer.pt also holds every rank's RNG states (`rng_ranks`); each
rank reads the folder back and takes its own shard and RNG states. `optimizer.pt` is read with
`torch.load(weights_only=True)` only, so everything in it is tensors, dicts, lists, tuples and numbers.
This module knows nothing of the training loop; it saves and restores state handed to it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from slimlm.checkpoint.atomic import atomic_folder, check_output
from slimlm.errors import InputError
from slimlm.train.distributed import all_gather_object, dist_info, full_tensor, shard_like

CHECKPOINTS = "checkpoints"  # sub-folder of out_dir
_STEP_FOLDER = re.compile(r"^step-(\d{6,})$")  # complete checkpoints only: temporary folders start with "."
_TMP_FOLDER = re.compile(r"^\.step-\d{6,}\.(tmp|old)-")  # left behind by a write that was killed


class ResumeError(InputError):
    """A checkpoint that cannot be resumed into this model or run; the message says what differs."""


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter for every parameter with requires_grad (named_parameters lists tied ones once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_folder(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first; half-written temporary folders are skipped."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        m = _STEP_FOLDER.match(folder.name)
        if m and folder.is_dir() and (folder / "state.json").is_file():
            found.append((int(m.group(1)), folder))
    return sorted(found)


def remove_partial_checkpoints(out_dir: str | Path) -> list[Path]:
    """Delete temporary folders a killed checkpoint write left behind; returns what was removed."""
    root = Path(out_dir) / CHECKPOINTS
    removed = [f for f in root.iterdir() if _TMP_FOLDER.match(f.name)] if root.is_dir() else []
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def check_run_folder(out_dir: str | Path, *, resume: bool, overwrite: bool, inputs: list) -> None:
    """The command line's guard for a training run's --out: refuse a folder that holds something unless the run
    continues it (`resume`) or replaces it (`overwrite`: its old checkpoints are removed so the run starts over);
    an --out that is or holds an input is always refused (check_output). ValueError says which flag to pass."""
    out = Path(out_dir)
    check_output(out, overwrite=True, inputs=inputs)  # inputs only: a non-empty run folder is decided here
    if resume or not out.is_dir() or not any(out.iterdir()):
        return
    if overwrite:
        if (out / CHECKPOINTS).is_dir():  # renamed first: a kill mid-delete leaves no half checkpoint to resume
            doomed = out / f".{CHECKPOINTS}.old-{os.getpid()}"
            os.rename(out / CHECKPOINTS, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return
    found = list_checkpoints(out)
    what = f"holds checkpoints of an earlier run (newest: {found[-1][1].name})" if found else "exists and is not empty"
    raise InputError(
        f"--out {out} {what}; pass --resume to continue the run, --overwrite to start over, or choose another --out"
    )


def rotate_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; called only after a new one is complete, so one always survives."""
    for _, folder in list_checkpoints(out_dir)[:-keep]:
        # Renamed out of sight first: a kill during the slow delete leaves a temporary folder (removed on resume),
        # never a step folder with some of its files gone.
        doomed = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed)


def rng_states() -> dict[str, Any]:
    """Global RNG states: torch CPU, CUDA (all devices) and python `random` (a tuple of ints: weights_only-safe)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> Path:
    """Write one checkpoint folder atomically: a kill at any moment leaves no folder or a complete one.

    Several processes: every rank must call it (gathering FSDP2 shards and RNG states is collective); rank 0 writes.
    """
    info = dist_info()
    tensors = {n: full_tensor(p.detach()).contiguous().cpu() for n, p in trainable_parameters(model).items()}
    extra = {
        "optimizer": _whole_optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    if info.distributed:
        extra["rng_ranks"] = all_gather_object(extra["rng"])
    if not info.is_main:
        return folder
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(extra, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    return folder


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler, scaler and RNG states from `folder`; returns state.json."""
    # weights_only: never run arbitrary pickled code from a checkpoint folder.
    extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    if (scaler is None) != (extra["scaler"] is None):
        raise ResumeError(
            f"{folder} was written {'without' if extra['scaler'] is None else 'with'} an fp16 "
            "GradScaler; resume with the precision the run started with"
        )
    load_trainable(folder / "trainable.safetensors", model)  # checks every name and shape before copying
    optimizer.load_state_dict(_sharded_optimizer_state(extra["optimizer"], optimizer))  # to each param's device
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(extra["scaler"])
    info = dist_info()
    set_rng_states(extra["rng_ranks"][info.rank] if info.distributed else extra["rng"])
    return json.loads((folder / "state.json").read_text())


def load_trainable(path: Path, model: nn.Module) -> None:
    """Copy saved tensors into the model's trainable parameters; any name, shape or dtype mismatch is an error."""
    saved = load_file(str(path))
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    wrong = [
        f"{n}: saved {tuple(saved[n].shape)} {saved[n].dtype}, model {tuple(p.shape)} {p.dtype}"
        for n, p in params.items()
        if n in saved and (saved[n].shape != p.shape or saved[n].dtype != p.dtype)
    ]
    if missing or unexpected or wrong:
        problems = [
            f"missing from checkpoint: {_names(missing)}" if missing else "",
            f"not trainable in the model: {_names(unexpected)}" if unexpected else "",
            f"mismatched: {_names(wrong)}" if wrong else "",
        ]
        raise ResumeError(
            f"{path} does not match the model's trainable parameters ("
            + "; ".join(p for p in problems if p)
            + "). Resume with the same model, PEFT method and "
            "settings as the run that wrote it, or train into a new out_dir"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(shard_like(saved[n], p))  # this rank's shard of an FSDP2 parameter


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order optimizer.state_dict() numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with FSDP2-sharded state tensors gathered whole (collective; plain tensors as is):
    the same layout one process saves."""
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        for i, st in sd["state"].items()
    }
    return sd


def _sharded_optimizer_state(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved (whole) optimizer state laid out like the optimizer's parameters: this rank's shard of each
    per-parameter tensor of an FSDP2 parameter; scalars (AdamW's step) stay as they are."""
    params = _optimizer_params(optimizer)
    state = {
        i: {
            k: shard_like(v, params[i]) if isinstance(v, torch.Tensor) and v.shape == params[i].shape else v
            for k, v in st.items()
        }
        for i, st in sd["state"].items()
    }
    return {**sd, "state": state}


def _names(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
