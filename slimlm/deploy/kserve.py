"""A KServe InferenceService (serving.kserve.io/v1beta1) whose predictor is a custom `slimlm serve` container.

Serverless mode (Knative): scale to zero by default (minReplicas 0) and out on concurrent requests per replica
(scaleMetric concurrency). Knative owns the pod's lifecycle, so this leaves out what it refuses or sets itself:
the port is named http1 (Knative's name for HTTP/1), no startupProbe, no preStop, no pod securityContext and no
terminationGracePeriodSeconds (Knative derives it from the revision timeout, 300 s by default, above any
reasonable --drain-timeout). With --mount, KServe's storage initializer mounts STORAGE_URI (pvc://...) at
/mnt/models.
"""

from __future__ import annotations

from slimlm.deploy.config import DeployConfig
from slimlm.deploy.k8s import Manifest, container, labels


def inference_service(cfg: DeployConfig, memory: str) -> Manifest:
    """The InferenceService: k8s.py's container, adjusted to what Knative accepts, under a scaling predictor."""
    c = container(cfg, memory, name="kserve-container")  # KServe's name for the predictor's main container
    c["ports"] = [{"name": "http1", "containerPort": cfg.port, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        c[probe]["httpGet"]["port"] = cfg.port  # Knative wants the probe port unset or the container's number
    if cfg.mount:
        uri = f"pvc://{cfg.pvc}/{cfg.pvc_subpath}".rstrip("/")
        c["env"].append({"name": "STORAGE_URI", "value": uri})
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": cfg.name,
            "labels": labels(cfg),
            "annotations": {"serving.kserve.io/deploymentMode": "Serverless"},
        },
        "spec": {
            "predictor": {
                "minReplicas": cfg.min_replicas,
                "maxReplicas": cfg.max_replicas,
                "scaleMetric": "concurrency",
                "scaleTarget": cfg.scale_target,
                "automountServiceAccountToken": False,
                "containers": [c],
                "volumes": [
                    {"name": "cache", "emptyDir": {"sizeLimit": "4Gi"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                ],
            }
        },
    }


def kserve_manifests(cfg: DeployConfig, memory: str) -> dict[str, list[Manifest]]:
    """File name -> the documents it holds."""
    return {"inferenceservice.yaml": [inference_service(cfg, memory)]}
