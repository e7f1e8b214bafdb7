"""`slimlm deploy docker|k8s|kserve|ray --model M --out DIR`: files to run `slimlm serve` in a container or a cluster.

Thin: flags onto DeployConfig (validated before anything is written), the --out guard, then bundle.write_bundle.
`ray` (a Ray Serve config file, or the deployment run now with --run) is handed to slimlm.deploy.ray.
"""

from __future__ import annotations

import argparse

from slimlm.checkpoint.atomic import OVERWRITE_HELP, check_output
from slimlm.deploy.config import TARGETS, DeployConfig, DeployError, parse_serve_args


def add_deploy_commands(sub) -> None:
    """Register `deploy` on the CLI's subparsers `sub`."""
    p = sub.add_parser(
        "deploy",
        help="write a Dockerfile, Kubernetes manifests, a KServe InferenceService or a Ray "
        "Serve config that run `slimlm serve` (nothing is built or applied; "
        "`deploy ray --run` deploys on Ray now)",
    )
    p.add_argument("target", help=f"what to write: {', '.join(TARGETS)}, ray")
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="alias, local HF folder or .gguf (copied into the image), or HF hub id (downloaded at "
        "image build time); with --mount, the model's path on the volume",
    )
    p.add_argument(
        "--out", default=None, help="output folder (written atomically); required, except with `deploy ray --run`"
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "--mount",
        action="store_true",
        help="do not bake the model into the image: read it from a volume (docker run -v; k8s: --pvc)",
    )
    p.add_argument("--pvc", default=None, help="k8s/kserve with --mount: the PersistentVolumeClaim holding the model")
    p.add_argument("--pvc-subpath", default="", help="the model's path inside the claim (default: its root)")
    p.add_argument("--revision", default=None, help="hub id: the commit or tag downloaded at build time")
    p.add_argument(
        "--name", default="slimlm", help="Kubernetes object name, Ray Serve application name (default: %(default)s)"
    )
    p.add_argument("--image", default="", help="image name:tag (default: slimlm-serve:<slimlm version>)")
    p.add_argument(
        "--port",
        type=int,
        default=0,
        help="container port, Ray's HTTP proxy port (default: 8080 for kserve, else 8000)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get after SIGTERM (the grace period is set above it)",
    )
    p.add_argument(
        "--serve-args",
        default="",
        metavar="'FLAGS'",
        help="more `slimlm serve` flags, quoted, e.g. --serve-args='--max-batch 8 --quantize int8'",
    )
    p.add_argument(
        "--min-replicas", type=int, default=None, help="default: 1 for k8s and ray, 0 (scale to zero) for kserve"
    )
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--cpu-target", type=int, default=70, help="k8s HPA: average CPU utilization, %% of the request")
    p.add_argument(
        "--scale-target",
        type=int,
        default=8,
        help="kserve, ray: concurrent requests per replica (the autoscaling target)",
    )
    p.add_argument(
        "--cpu",
        default=None,
        help="CPU request and limit per pod (default: 2); ray: CPUs per replica, also its torch threads (default: 1)",
    )
    p.add_argument("--memory", default=None, help="memory request and limit, e.g. 3Gi (default: estimated)")
    p.add_argument(
        "--api-key-secret",
        default=None,
        metavar="SECRET",
        help="k8s/kserve: read the API key from this Secret into SLIMLM_API_KEY (no value is written)",
    )
    p.add_argument("--api-key-secret-key", default="api-key", help="the key inside that Secret")
    from slimlm.deploy.ray import add_ray_args

    add_ray_args(p)
    p.set_defaults(func=cmd_deploy)


def config_from_args(args: argparse.Namespace) -> DeployConfig:
    """The validated DeployConfig of the parsed flags (raises DeployError, one line, listing every problem)."""
    cfg = DeployConfig(
        target=args.target,
        model=args.model,
        mount=args.mount,
        name=args.name,
        image=args.image,
        port=args.port,
        drain_timeout=args.drain_timeout,
        serve_args=parse_serve_args(args.serve_args),
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        cpu_target=args.cpu_target,
        scale_target=args.scale_target,
        cpu=args.cpu or "2",
        memory=args.memory,
        api_key_secret=args.api_key_secret,
        api_key_secret_key=args.api_key_secret_key,
        pvc=args.pvc,
        pvc_subpath=args.pvc_subpath,
        revision=args.revision,
    )
    cfg.validate()
    return cfg


def cmd_deploy(args: argparse.Namespace) -> int:
    """`slimlm deploy TARGET`: validate, guard --out, write the bundle."""
    from slimlm.deploy.bundle import write_bundle

    if args.target == "ray":
        from slimlm.deploy.ray import cmd_deploy_ray

        return cmd_deploy_ray(args)
    cfg = config_from_args(args)  # every flag checked before --out is touched
    if args.out is None:
        raise DeployError(f"deploy {args.target} needs --out DIR: the folder to write the files into")
    out = check_output(args.out, overwrite=args.overwrite, inputs=[args.model])
    names = write_bundle(cfg, out)
    print(f"wrote {out}: {', '.join(names)} (nothing was built or applied; see {out / 'README.md'})")
    return 0
