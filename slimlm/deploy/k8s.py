"""Kubernetes manifests for `slimlm serve`: Deployment, Service and a CPU HorizontalPodAutoscaler (autoscaling/v2).

Plain dicts, in the order kubectl prints fields; rendering to YAML is bundle.py's job. The container here is
shared with kserve.py. Probes follow the server: /health answers as soon as the process is up (liveness), /ready
only once the model is loaded and not while draining (readiness, and the startup gate for a slow load). On delete
the pod waits PRESTOP_SLEEP_S for endpoints to drop it, gets SIGTERM, drains for --drain-timeout and exits; the grace
period covers all three.
"""

from __future__ import annotations

from typing import Any

from slimlm.deploy.config import CACHE_DIR, PRESTOP_SLEEP_S, UID, DeployConfig

Manifest = dict[str, Any]


def labels(cfg: DeployConfig) -> dict[str, str]:
    """The labels every object carries; the Service and Deployment select pods by them."""
    return {"app.kubernetes.io/name": "slimlm", "app.kubernetes.io/instance": cfg.name}


def http_probe(path: str, port: int | str, period: int, failures: int, timeout: int = 3) -> Manifest:
    """An HTTP GET probe of `path` on the container port (by name or number)."""
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def env(cfg: DeployConfig) -> list[Manifest]:
    """OMP threads from the CPU request; the API key, when wanted, only as a reference to a Secret."""
    out: list[Manifest] = [{"name": "OMP_NUM_THREADS", "value": str(cfg.threads())}]
    if cfg.api_key_secret:
        out.append(
            {
                "name": "SLIMLM_API_KEY",  # slimlm serve reads it (keeps the key out of `ps` and the args)
                "valueFrom": {"secretKeyRef": {"name": cfg.api_key_secret, "key": cfg.api_key_secret_key}},
            }
        )
    return out


def container_security() -> Manifest:
    """Non-root (the image's numeric user), no privilege escalation, no capabilities, read-only root."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def container(cfg: DeployConfig, memory: str, *, name: str = "slimlm") -> Manifest:
    """The `slimlm serve` container: args, port, probes on the container port, resources, read-only root."""
    command = cfg.serve_command()
    resources = {"cpu": cfg.cpu, "memory": memory}
    return {
        "name": name,
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command[:2],
        "args": command[2:],
        "ports": [{"name": "http", "containerPort": cfg.port, "protocol": "TCP"}],
        "env": env(cfg),
        # requests == limits: Guaranteed QoS, and the HPA's utilization is a share of a fixed CPU budget
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "readinessProbe": http_probe("/ready", "http", period=5, failures=2),
        "livenessProbe": http_probe("/health", "http", period=10, failures=3, timeout=5),
        "securityContext": container_security(),
        "volumeMounts": volume_mounts(cfg),
    }


def volume_mounts(cfg: DeployConfig) -> list[Manifest]:
    """The writable cache and /tmp, and with --mount on k8s the model's claim, read-only."""
    mounts = [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    if cfg.mount and cfg.target == "k8s":
        mount = {"name": "model", "mountPath": cfg.container_model(), "readOnly": True}
        if cfg.pvc_subpath:
            mount["subPath"] = cfg.pvc_subpath
        mounts.append(mount)
    return mounts


def volumes(cfg: DeployConfig) -> list[Manifest]:
    """Writable emptyDirs for the caches (converted GGUF, compiled kernel, HF files) and /tmp; the model's PVC."""
    out: list[Manifest] = [
        {"name": "cache", "emptyDir": {"sizeLimit": "4Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if cfg.mount and cfg.target == "k8s":
        out.append({"name": "model", "persistentVolumeClaim": {"claimName": cfg.pvc, "readOnly": True}})
    return out


def deployment(cfg: DeployConfig, memory: str) -> Manifest:
    """apps/v1 Deployment; replicas are left to the HPA (a replicas field would fight it on every apply)."""
    c = container(cfg, memory)
    # Liveness waits until the first /ready: loading (and a first GGUF conversion or kernel build) may take minutes.
    c["startupProbe"] = http_probe("/ready", "http", period=5, failures=120)
    c["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}}
    pod = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": cfg.grace_period_s(),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [c],
        "volumes": volumes(cfg),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": cfg.name, "labels": labels(cfg)},
        "spec": {
            "selector": {"matchLabels": labels(cfg)},
            # one new pod at a time and none removed before its replacement is ready: no capacity dip
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels(cfg)}, "spec": pod},
        },
    }


def service(cfg: DeployConfig) -> Manifest:
    """v1 ClusterIP Service: port 80 to the container's named port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": cfg.name, "labels": labels(cfg)},
        "spec": {
            "type": "ClusterIP",
            "selector": labels(cfg),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def hpa(cfg: DeployConfig) -> Manifest:
    """autoscaling/v2 HPA on average CPU utilization (a share of the CPU request)."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": cfg.name, "labels": labels(cfg)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": cfg.name},
            "minReplicas": cfg.min_replicas,
            "maxReplicas": cfg.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": cfg.cpu_target},
                    },
                }
            ],
        },
    }


def k8s_manifests(cfg: DeployConfig, memory: str) -> dict[str, list[Manifest]]:
    """File name -> the documents it holds."""
    return {"deployment.yaml": [deployment(cfg, memory)], "service.yaml": [service(cfg)], "hpa.yaml": [hpa(cfg)]}


__all__ = ["container", "deployment", "hpa", "k8s_manifests", "service"]
