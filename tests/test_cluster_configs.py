"""Every file in cluster/: parses, has the keys its kind needs, matches constraints.txt's versions,
installs emtune with the constraints, exposes nothing beyond loopback or the cluster, holds no secret."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray.autoscaler
import yaml

from emtune.cli.submit import DRIVER_ENV_PASSTHROUGH, load_runtime_env

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))


def _pin(package: str) -> str:
    text = (ROOT / "constraints.txt").read_text()
    return re.search(rf"^{re.escape(package)}==(\S+)$", text, re.MULTILINE | re.IGNORECASE).group(1)


RAY, MLFLOW = _pin("ray"), _pin("mlflow")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` anywhere in ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _by_kind() -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    kinds: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path in YAML_FILES:
        for doc in _docs(path):
            kind = "autoscaler" if "available_node_types" in doc else doc.get("kind", "runtime_env")
            kinds.setdefault(kind, []).append((path, doc))
    return kinds


KINDS = _by_kind()


def test_expected_files_and_kinds() -> None:
    names = {p.name for p in CLUSTER.iterdir()}
    assert {"aws.yaml", "gcp.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml",
            "runtime_env.yaml", "README.md", "Dockerfile"} <= names
    assert {p.name for p, _ in KINDS["autoscaler"]} == {"aws.yaml", "gcp.yaml"}
    assert [p.name for p, _ in KINDS["RayCluster"]] == ["kuberay-raycluster.yaml"]
    assert [p.name for p, _ in KINDS["RayJob"]] == ["kuberay-rayjob.yaml"]
    assert [p.name for p, _ in KINDS["runtime_env"]] == ["runtime_env.yaml"]


@pytest.mark.parametrize("name,provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_autoscaler_config(name: str, provider: str) -> None:
    config = _docs(CLUSTER / name)[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # Ray's own schema for `ray up` configs
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    # At least one preemptible and one non-preemptible GPU type; only the latter offer on_demand.
    on_demand = {n for n, t in workers.items() if "on_demand" in t["resources"]}
    assert on_demand and on_demand != set(workers)
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert config["file_mounts"] == {"/home/ray/emtune": "."}  # no token file copied from a laptop
    assert ".venv" in config["rsync_exclude"]
    _check_token_from_secret_manager(config, provider)


def _check_token_from_secret_manager(config: dict[str, Any], provider: str) -> None:
    """Token auth on every node, the token read from the cloud's secret manager on the host into
    an owner-only file mounted read-only into the container (never the image, never env files)."""
    fetch = {"aws": "aws secretsmanager get-secret-value", "gcp": "gcloud secrets versions access"}[provider]
    init = config["initialization_commands"]
    token = [c for c in init if fetch in c and "/etc/emtune/ray_token" in c]
    assert len(token) == 1 and "umask 077" in token[0] and "chown 1000" in token[0], init
    assert any(fetch in c and "/etc/emtune/node.env" in c and "umask 077" in c for c in init)
    assert "-v /etc/emtune:/etc/emtune:ro" in config["docker"]["run_options"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/etc/emtune/ray_token" in start, key
        assert start.index("RAY_AUTH_MODE=token") < start.index("ray start")
        assert ". /etc/emtune/node.env" in start  # judge key and MLflow login from the secret too


def test_raycluster_manifest() -> None:
    (_, doc), = KINDS["RayCluster"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"])


def test_rayjob_manifest() -> None:
    (_, doc), = KINDS["RayJob"]
    spec = doc["spec"]
    assert doc["apiVersion"] == "ray.io/v1"
    assert spec["entrypoint"].startswith("emtune run /work/spec.yaml")
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    if "rayClusterSpec" in spec:
        _check_cluster_spec(spec["rayClusterSpec"])
        volumes = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
        assert {"name": "spec", "configMap": {"name": "emtune-spec"}} in volumes
    env_vars = yaml.safe_load(spec.get("runtimeEnvYAML", "{}")).get("env_vars", {})
    # Ray refuses a driver whose ray.init env_vars repeat a job env key; emtune's driver sets these.
    assert not set(env_vars) & {*DRIVER_ENV_PASSTHROUGH, "TOKENIZERS_PARALLELISM"}
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == RAY
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_image_matches_the_pins() -> None:
    images = [(p.name, image) for p in YAML_FILES for d in _docs(p) for image in _walk(d, "image")]
    assert len(images) >= 8
    for name, image in images:
        repo, _, tag = image.rpartition(":")
        if repo == "rayproject/ray":
            assert tag.split("-")[0] == RAY, (name, image)
        elif repo.endswith("/emtune"):
            assert f"ray{RAY}-" in tag, (name, image)
        elif repo.endswith("mlflow/mlflow"):
            assert tag == f"v{MLFLOW}", (name, image)
        elif repo == "vllm/vllm-openai":
            assert tag in _vllm_tags(), (name, image)
        else:
            pytest.fail(f"{name}: unexpected image {image}")
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{RAY}-")


def test_emtune_is_installed_with_the_constraints() -> None:
    lines = [c for p, d in KINDS["autoscaler"] for key in ("setup_commands", "head_setup_commands",
             "worker_setup_commands") for c in d.get(key, [])]
    lines += [ln for ln in (CLUSTER / "Dockerfile").read_text().splitlines() if "pip install" in ln]
    emtune_installs = [ln for ln in lines if "pip install" in ln and "emtune" in ln]
    assert len(emtune_installs) == 3  # aws, gcp, Dockerfile
    for line in emtune_installs:
        assert re.search(r"-c \S*constraints\.txt", line), line


def test_mlflow_server_needs_a_login_and_ray_pods_have_it() -> None:
    [deployment] = [d for p, d in KINDS["Deployment"] if d["metadata"]["name"] == "mlflow"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert "mlflow server --app-name basic-auth" in command and "Flask-WTF" in command
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "emtune-mlflow-auth"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "emtune-mlflow-auth"
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    [config_map] = [d for _, d in KINDS["ConfigMap"] if d["metadata"]["name"] == "mlflow-auth"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert config_path.rsplit("/", 1)[0] in mounts
    ini = config_map["data"][config_path.rsplit("/", 1)[1]]
    assert "default_permission = NO_PERMISSIONS" in ini and "admin_username = emtune" in ini
    assert "admin_password" not in ini  # from the Secret, never the ConfigMap
    for kind in ("RayCluster", "RayJob"):
        for _, doc in KINDS[kind]:
            containers = [c for c in _walk(doc, "containers") for c in c]
            assert containers
            for c in containers:
                names = {e["name"]: e for e in c["env"]}
                assert names["MLFLOW_TRACKING_USERNAME"]["value"] == "emtune"
                ref = names["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "emtune-mlflow-auth", "key": "MLFLOW_TRACKING_PASSWORD"}


def test_servers_are_loopback_or_cluster_internal() -> None:
    k8s = [(p, d) for p in YAML_FILES for d in _docs(p) if "kind" in d]
    assert not [d for _, d in k8s if d["kind"] == "Ingress"]
    for path, doc in k8s:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name
        for service_type in _walk(doc, "serviceType"):
            assert service_type == "ClusterIP", path.name
    for path in YAML_FILES + [CLUSTER / "README.md"]:
        text = path.read_text()
        for match in re.finditer(r"--dashboard-host[= ](\S+)", text):
            assert match.group(1) == "127.0.0.1", path.name
        assert "--dashboard-host=0.0.0.0" not in text and "type: LoadBalancer" not in text


SECRET_PATTERNS = [
    r"sk-[A-Za-z0-9_-]{20,}",               # OpenAI-style keys
    r"AKIA[0-9A-Z]{16}",                    # AWS access key ids
    r"hf_[A-Za-z0-9]{30,}",                 # Hugging Face tokens
    r"\b[0-9a-f]{64}\b",                    # a Ray auth token (secrets.token_hex(32))
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"postgres(ql)?://[^:/\s]+:[^@\s]+@",   # a password inside a database URI
    # a literal value (16+ characters, some digits) after a secret-sounding name
    r"(?i)(password|secret|api_key|token)\s*[:=]\s*['\"]?(?=[A-Za-z0-9+/_-]*\d)[A-Za-z0-9+/_-]{16,}",
]


@pytest.mark.parametrize("path", sorted(CLUSTER.iterdir()), ids=lambda p: p.name)
def test_no_secret_values(path: Path) -> None:
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), (path.name, pattern)
    for doc in _docs(path) if path.suffix == ".yaml" else []:
        for env in _walk(doc, "env"):
            for entry in env if isinstance(env, list) else []:
                if re.search(r"KEY|TOKEN|SECRET|PASSWORD", entry["name"]):
                    assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry


def test_secret_patterns_catch_secrets() -> None:
    leaky = ["OPENAI_API_KEY: sk-abcdefghijklmnopqrstuvwxyz123", "token: " + "ab12" * 16,
             "--backend-store-uri postgresql://mlflow:hunter2@db:5432/mlflow",
             "PGPASSWORD=Zx81bnQ2pLm0Tr7Kw", "-----BEGIN OPENSSH PRIVATE KEY-----"]
    for text in leaky:
        assert any(re.search(p, text) for p in SECRET_PATTERNS), text


def test_runtime_env_file_is_accepted_by_submit() -> None:
    extra = load_runtime_env(str(CLUSTER / "runtime_env.yaml"))
    assert extra["env_vars"] == {"EMTUNE_CACHE_DIR": "/mnt/shared/emtune-cache",
                                 "HF_HOME": "/mnt/shared/hf-cache"}
    assert "working_dir" not in extra and "py_modules" not in extra


def test_generation_server_demands_its_key_and_the_trials_have_it() -> None:
    """vLLM starts only with VLLM_API_KEY from a secret (k8s: a required Secret; VMs: the node env
    secret's line, and only that line, in an owner-only env file); the Ray pods get the same Secret."""
    [deployment] = [d for p, d in KINDS["Deployment"] if d["metadata"]["name"] == "vllm"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ref = {e["name"]: e for e in container["env"]}["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "emtune-vllm", "key": "VLLM_API_KEY"}  # not optional: no key, no server
    for kind in ("RayCluster", "RayJob"):
        for _, doc in KINDS[kind]:
            for c in (c for group in _walk(doc, "containers") for c in group):
                ref = {e["name"]: e for e in c["env"]}["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "emtune-vllm" and ref["key"] == "VLLM_API_KEY"
    for path, config in KINDS["autoscaler"]:
        commands = config["available_node_types"]["gpu_vllm"]["initialization_commands"]
        [extract] = [c for c in commands if "/etc/emtune/vllm.env" in c and "docker run" not in c]
        assert "umask 077" in extract and 'grep "^VLLM_API_KEY=."' in extract and "/etc/emtune/node.env" in extract
        run = next(c for c in commands if "docker run" in c)
        assert "--env-file /etc/emtune/vllm.env" in run and commands.index(extract) < commands.index(run), path.name
    assert "api_key_env: VLLM_API_KEY" in (CLUSTER / "README.md").read_text()


def test_a_node_type_with_its_own_commands_still_gets_the_secrets() -> None:
    """A node type's initialization_commands replace the global list: every one of them must still
    mount the shared storage and fetch the Ray token and the node env, or its Ray cannot join the
    token-authenticated cluster."""
    for path, config in KINDS["autoscaler"]:
        for name, node in config["available_node_types"].items():
            own = node.get("initialization_commands")
            if own is not None:
                missing = [c for c in config["initialization_commands"] if c not in own]
                assert not missing, (path.name, name, missing)


def test_readme_covers_the_operations() -> None:
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up cluster/aws.yaml", "ssh -i", "-L 8265:127.0.0.1:8265 -L 5000:127.0.0.1:5000",
                   "mlflow server", "--artifacts-destination s3://", "tracking:", "http://mlflow:5000",
                   "output_dir", "NFS", "emtune submit", "emtune status", "emtune logs",
                   "RAY_AUTH_MODE=token", "HF_HUB_OFFLINE", "secretKeyRef",
                   # authentication set-up: token and MLflow login from secrets, the client's token
                   "aws secretsmanager create-secret --name emtune/ray-token", "emtune/node-env",
                   "roles/secretmanager.secretAccessor", "export RAY_AUTH_TOKEN=", "--app-name basic-auth",
                   "MLFLOW_TRACKING_PASSWORD", "kubectl create secret generic emtune-mlflow-auth"):
        assert needle in text, needle


def _vllm_tags() -> set[str]:
    """Every vLLM image tag named in cluster/ (manifests and the autoscaler configs' docker run)."""
    return {m.group(1) for p in YAML_FILES for m in re.finditer(r"vllm/vllm-openai:(\S+)", p.read_text())}


def test_generation_server_runs_beside_the_ray_workers() -> None:
    """vLLM with runtime LoRA loading, one version everywhere, reading adapters from the shared
    volume at the trials' path, on KubeRay (Deployment + ClusterIP Service) and on the VM configs."""
    from emtune.models import LoraSpec

    [tag] = _vllm_tags()
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag)
    docs = {d["kind"]: d for d in _docs(CLUSTER / "kuberay-vllm.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    flags = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), "") for a in container["args"])
    assert "enable-lora" in flags and int(flags["max-lora-rank"]) >= LoraSpec().r
    assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "emtune-shared"}} in pod["volumes"]
    service = docs["Service"]["spec"]
    assert service["type"] == "ClusterIP" and service["sessionAffinity"] == "ClientIP"
    assert service["ports"][0]["port"] == 8000 and docs["Service"]["metadata"]["name"] == "vllm"
    for path, config in KINDS["autoscaler"]:
        node = config["available_node_types"]["gpu_vllm"]
        assert node["min_workers"] >= 1 and node["resources"]["vllm_server"] == 1
        commands = node["initialization_commands"]
        assert config["initialization_commands"][0] in commands  # its own list replaces the global mount
        run = next(c for c in commands if "docker run" in c)
        for needle in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "--enable-lora", "-v /mnt/shared:/mnt/shared",
                       "--gpus '\"device=3\"'", f"--max-lora-rank {LoraSpec().r}"):
            assert needle in run, (path.name, needle)
        assert node["docker"]["worker_run_options"] == ["-e NVIDIA_VISIBLE_DEVICES=0,1,2"]
        assert node["resources"]["GPU"] == 3  # the Ray container's share; vLLM has the 4th
    readme = (CLUSTER / "README.md").read_text()
    for needle in ("Generation server (`evaluation.backend: server`)", "evaluation.backend: server", "http://vllm:8000/v1",
                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "kuberay-vllm.yaml", "gpu_vllm", "emtune resume"):
        assert needle in readme, needle
