"""`slimlm deploy`: the files that run `slimlm serve` in Docker, on Kubernetes, or as a KServe InferenceService.

config.py: DeployConfig (validated once) and the container's command line; docker.py: Dockerfile and build
context; k8s.py: Deployment, Service, HPA; kserve.py: InferenceService; resources.py: the memory request;
bundle.py: render and write the output folder; cli.py: the command. This package writes files only: it builds no
image, starts no container and talks to no cluster.
"""

from slimlm.deploy.config import TARGETS, DeployConfig, DeployError

__all__ = ["TARGETS", "DeployConfig", "DeployError"]
