"""Every shipped cluster file validates against the schema of the tool that reads it: the Ray cluster
launcher YAMLs against Ray's own `ray-schema.json`, the KubeRay manifests against the KubeRay CRDs
(spec.versions[v1].schema.openAPIV3Schema), plus what those schemas cannot see: typos in field names,
the RayService's Serve config, and the RayJob's `rayft train` command line."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

LAUNCHER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY_FILES = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
KIND_TO_CRD = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


def kuberay_schemas() -> Path:
    """The KubeRay CRDs (kept beside the project, see SOURCE.md there), or RAYFT_KUBERAY_SCHEMAS."""
    for candidate in (os.environ.get("RAYFT_KUBERAY_SCHEMAS"), ROOT.parent / "shared" / "schemas" / "kuberay"):
        if candidate and (Path(candidate) / "ray.io_rayclusters.yaml").exists():
            return Path(candidate)
    pytest.skip("KubeRay CRD schemas not found: set RAYFT_KUBERAY_SCHEMAS to a folder with ray.io_*.yaml")


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((kuberay_schemas() / KIND_TO_CRD[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not define (Kubernetes would drop them silently: a typo loses a setting)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(doc, dict) and "properties" in schema:
        for key, value in doc.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}".lstrip("."))
            else:
                out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in doc.items():
            out += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(doc):
            out += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return out


def test_every_cluster_file_is_covered():
    assert [p.name for p in LAUNCHER_FILES] == ["aws.yaml", "gcp.yaml"]
    kinds = sorted(yaml.safe_load(p.read_text())["kind"] for p in KUBERAY_FILES)
    assert kinds == ["RayCluster", "RayJob", "RayService"]
    for p in LAUNCHER_FILES + KUBERAY_FILES:  # each says how to use it, first thing
        assert p.read_text().startswith("# "), p


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_rays_schema(path):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs: defaults filled in, then checked
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["max_workers"] >= 1 for t in workers.values())
    node = next(iter(workers.values()))["node_config"]
    if config["provider"]["type"] == "aws":
        assert node["InstanceType"] == "p5.48xlarge"  # 8x H100
    else:
        assert node["guestAccelerators"] == [{"acceleratorType": "nvidia-h100-80gb", "acceleratorCount": 8}]
    # rayft reaches every node at the pins it was tested with
    assert config["file_mounts"] == {"~/rayft": "."}
    assert any("-c ~/rayft/constraints.txt" in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_its_crd(path):
    import jsonschema

    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    schema = crd_schema(doc["kind"])
    jsonschema.validate(doc, schema)
    assert unknown_fields(doc, schema) == []
    cluster = {
        "RayCluster": lambda d: d["spec"],
        "RayJob": lambda d: d["spec"]["rayClusterSpec"],
        "RayService": lambda d: d["spec"]["rayClusterConfig"],
    }[doc["kind"]](doc)
    assert cluster["rayVersion"] == "2.60.0"
    gpus = [
        g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for g in cluster["workerGroupSpecs"]
    ]
    assert gpus and all(int(n) >= 1 for n in gpus)


def test_unknown_fields_catch_a_typo():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert unknown_fields(doc, crd_schema("RayCluster")) == ["spec.workerGroupSpecs[0].maxReplica"]


def test_rayservice_serve_config_is_a_valid_rayft_app():
    from ray.serve.schema import ServeDeploySchema

    from rayft.serving.config import ServeConfig

    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "rayft.serving.app:app_builder"
    cfg = ServeConfig(**app["args"]["serve"])  # the replica builds exactly this from the args
    assert cfg.gpus_per_replica == 1 and cfg.autoscaling.max_replicas == 8
    assert set(app["args"]) >= {"model_path", "model_name", "serve", "adapters", "adapter_roots", "key_hashes"}
    # It binds 0.0.0.0 with no key in its args: every pod gets the key from a Secret, and a replica that found
    # none would refuse to start.
    from rayft.serving.spec import KeyRing, ServeError, ServeSpec, check_bind

    spec = ServeSpec(**{k: v for k, v in app["args"].items()})
    assert spec.serve.host == "0.0.0.0" and spec.key_hashes == []
    cluster = doc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        (env,) = [e for e in pod["template"]["spec"]["containers"][0]["env"] if e["name"] == spec.serve.api_key_env]
        assert env["valueFrom"]["secretKeyRef"]["name"] == "rayft-api-key"
    with pytest.raises(ServeError, match="no API key"):
        check_bind(spec.serve, KeyRing(spec, environ={}).required)
    check_bind(spec.serve, KeyRing(spec, environ={"RAYFT_API_KEY": "from-the-secret"}).required)
    # Uploads and jobs live on a volume every pod mounts from one ReadWriteMany claim (the ingress may run on any
    # pod, a job's driver on another, and both outlive a restart), not on whichever pod hosts the ingress.
    store = Path(spec.serve.finetune.storage_path)
    for pod in pods:
        spec_ = pod["template"]["spec"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec_["volumes"]}
        mounts = spec_["containers"][0]["volumeMounts"]
        on = [m for m in mounts if store.is_relative_to(m["mountPath"]) and claims.get(m["name"]) == "rayft-runs"]
        assert on, (store, pod["template"]["spec"]["containers"][0]["name"])


def test_rayjob_entrypoint_is_a_valid_rayft_train_command():
    from rayft.cluster.config import load_config

    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["rayft", "train"]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    job = load_config(ROOT / argv[2], overrides)  # the image's working dir is the repository root
    assert job.scaling.use_gpu and job.scaling.num_workers == 8
    assert job.run.storage_path == "/mnt/runs"
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
        for g in workers
    )
    assert gpus >= job.scaling.num_workers * job.scaling.gpus_per_worker
