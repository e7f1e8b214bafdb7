"""Running a training command on several processes: `--nproc N` re-runs the same command under torchrun.

`slimlm finetune|distill --nproc N` calls `run_torchrun`, which starts `python -m torch.distributed.run ... -m slimlm
<the same command without --nproc>`; each rank then trains (train/distributed.py). `peer_failure_message` turns a
failed collective on one rank into one line that says how to resume.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from slimlm.errors import InputError

# torchrun's flags that `slimlm finetune --nproc N` passes through (multi-node: --nnodes, --node-rank, --rdzv-*).
LAUNCH_FLAGS = (
    "--nnodes",
    "--node-rank",
    "--rdzv-endpoint",
    "--rdzv-backend",
    "--rdzv-id",
    "--master-addr",
    "--master-port",
)


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (runs torchrun; or launch `torchrun --nproc-per-node N -m slimlm ...`)")
    g.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes on this machine (torchrun --nproc-per-node N); --train.strategy "
        "ddp|fsdp picks how; the global batch stays train.batch_size x train.grad_accum",
    )
    for flag in LAUNCH_FLAGS:
        g.add_argument(flag, default=None, help="passed to torchrun")


def run_torchrun(args: argparse.Namespace, batch_size: int) -> int:
    """Run this same command under torchrun with --nproc-per-node N (the launch flags go to torchrun, the rest to
    `python -m slimlm`); returns torchrun's exit status, non-zero when any rank failed."""
    import os
    import subprocess

    if args.nproc < 1:
        raise InputError(f"--nproc must be a positive number of processes, got {args.nproc}")
    nodes = int(args.nnodes or 1) if str(args.nnodes or 1).isdigit() else 1  # "1:4" (elastic): checked by each rank
    if batch_size % (args.nproc * nodes):
        raise InputError(
            f"--train.batch_size {batch_size} is the global micro-batch, split over {args.nproc * nodes} "
            f"processes: make it a multiple of {args.nproc * nodes}"
        )
    launch = [
        f"{flag}={getattr(args, flag[2:].replace('-', '_'))}"
        for flag in LAUNCH_FLAGS
        if getattr(args, flag[2:].replace("-", "_")) is not None
    ]
    single_node = args.nnodes in (None, "1") and args.rdzv_endpoint is None and args.master_port is None
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={args.nproc}",
        *(["--standalone"] if single_node else []),
        *launch,
        "-m",
        "slimlm",
        *strip_launch_flags(args.argv),
    ]
    env = dict(os.environ)
    # torchrun would give each rank 1 thread; share this machine's cores instead (OMP_NUM_THREADS set wins).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    print("slimlm: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env).returncode


@contextmanager
def peer_failure_message(command: str, out: str, info) -> Iterator[None]:
    """Several processes: a collective that fails (a peer died: connection reset; or hung: timeout) exits this rank
    with status 1 and one line saying what happened and how to resume, instead of a traceback per rank."""
    try:
        yield
    except RuntimeError as e:
        if not info.distributed:
            raise
        cause = " ".join(str(e).split())[:300]
        print(
            f"slimlm {command}: error: rank {info.rank} of {info.world_size} stopped: a collective failed, so "
            f"another rank probably died or hung (see its log). Complete checkpoints in {out}/checkpoints stay "
            f"valid: rerun with --resume and the same number of processes. Cause: {cause}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def strip_launch_flags(argv: list[str]) -> list[str]:
    """argv without --nproc and the torchrun flags (each as `--flag V` or `--flag=V`)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--nproc", *LAUNCH_FLAGS):
            skip = True
        elif not token.startswith(tuple(f"{f}=" for f in ("--nproc", *LAUNCH_FLAGS))):
            out.append(token)
    return out
