"""Deployment configs parse and pass schema checks (``ray up`` and ``kubectl`` cannot run here).

* ``cluster.yaml`` is validated against Ray's own cluster-launcher JSON schema
  (``ray/autoscaler/ray-schema.json`` in the installed ray) and through Ray's own
  ``prepare_config`` + ``validate_config`` (what ``ray up`` does before it talks to the cloud),
  plus our checks: the setup installs this project with a CUDA torch, and GPUs are declared.
* The KubeRay manifests are validated against a hand-written schema that is a **subset** of the
  ray.io/v1 CRDs: only the fields these manifests use (apiVersion, kind, the required spec fields,
  head/worker group templates, container images, resources and GPU limits). It catches typos and
  missing fields, not every constraint the operator enforces.
* The GitHub workflow runs ``.ci/run`` (set-up, ``ruff check .``, every test) with CPU torch.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to validate the deploy configs")

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


# ---- cluster.yaml ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_yaml(ROOT / "cluster.yaml")


def test_cluster_yaml_passes_rays_bundled_schema(cluster):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_cluster_yaml_passes_rays_own_prepare_and_validate(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_declares_an_autoscaling_8_gpu_worker_type(cluster):
    types = cluster["available_node_types"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no node type declares GPU resources"
    for t in gpu_types.values():
        assert t["resources"]["GPU"] == 8
        assert t["min_workers"] == 0 < t["max_workers"] <= cluster["max_workers"]
        assert t["node_config"]["InstanceType"] == "p5.48xlarge"
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert cluster["idle_timeout_minutes"] > 0


def test_cluster_setup_installs_this_project_with_cuda_torch(cluster):
    remote_dirs = [remote for remote, local in cluster["file_mounts"].items() if local in (".", "./")]
    assert remote_dirs, "file_mounts must copy this checkout to the nodes"
    setup = "\n".join(cluster["setup_commands"])
    assert "scripts/setup.sh" in setup
    assert "download.pytorch.org/whl/cu" in setup, "the GPU nodes need the CUDA build of torch"
    assert Path(remote_dirs[0]).name in setup or "~/nanochat" in setup
    assert (ROOT / "scripts" / "setup.sh").is_file()
    assert any("**/.venv" in pattern for pattern in cluster.get("rsync_exclude", []))


def test_cluster_dashboard_is_bound_to_localhost(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


# ---- KubeRay manifests ------------------------------------------------------------------------------

_QUANTITY = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer", "minimum": 0}]}
_RESOURCES = {
    "type": "object",
    "required": ["limits"],
    "properties": {
        "requests": {"type": "object", "additionalProperties": _QUANTITY},
        "limits": {"type": "object", "required": ["cpu", "memory"], "additionalProperties": _QUANTITY},
    },
    "additionalProperties": False,
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "image": {"type": "string", "minLength": 1},
        "workingDir": {"type": "string"},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "resources": _RESOURCES,
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
    "additionalProperties": False,
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "tolerations": {"type": "array"},
            },
            "additionalProperties": False,
        }
    },
}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object", "properties": {"idleTimeoutSeconds": {"type": "integer"}}},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "properties": {
                "rayStartParams": _STR_MAP,
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "template": _POD_TEMPLATE,
            },
            "additionalProperties": False,
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"],
                "properties": {
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "rayStartParams": _STR_MAP,
                    "template": _POD_TEMPLATE,
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}


def _kuberay_resource(kind: str, spec_required: list[str], spec_properties: dict) -> dict:
    """A KubeRay ``ray.io/v1`` resource: apiVersion, kind, a named metadata, and a closed ``spec``."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            "spec": {"type": "object", "required": spec_required, "properties": spec_properties,
                     "additionalProperties": False},
        },
    }


RAYJOB_SCHEMA = _kuberay_resource("RayJob", ["entrypoint", "rayClusterSpec"], {
    "entrypoint": {"type": "string", "minLength": 1},
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "shutdownAfterJobFinishes": {"type": "boolean"},
    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
    "backoffLimit": {"type": "integer", "minimum": 0},
    "runtimeEnvYAML": {"type": "string"},
    "rayClusterSpec": _RAY_CLUSTER_SPEC,
})
RAYSERVICE_SCHEMA = _kuberay_resource("RayService", ["serveConfigV2", "rayClusterConfig"], {
    "serveConfigV2": {"type": "string"}, "rayClusterConfig": _RAY_CLUSTER_SPEC,
})
# The part of Serve's config file format (serve/production-guide/config) that serveConfigV2 uses.
SERVE_CONFIG_SCHEMA = {
    "type": "object",
    "required": ["applications"],
    "properties": {
        "proxy_location": {"enum": ["EveryNode", "HeadOnly", "Disabled"]},
        "http_options": {"type": "object", "properties": {"host": {"type": "string"}, "port": {"type": "integer"}}},
        "applications": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "import_path"],
                "properties": {
                    "name": {"type": "string"},
                    "route_prefix": {"type": "string", "pattern": "^/"},
                    "import_path": {"type": "string", "pattern": r"^[\w.]+:\w+$"},
                    "args": {"type": "object"},
                    "runtime_env": {"type": "object"},
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}


def cluster_specs(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml(KUBERAY / "rayjob-pretrain.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load_yaml(KUBERAY / "rayservice.yaml")


def test_rayjob_matches_the_crd_subset(rayjob):
    jsonschema.validate(rayjob, RAYJOB_SCHEMA)


def test_rayservice_matches_the_crd_subset(rayservice):
    jsonschema.validate(rayservice, RAYSERVICE_SCHEMA)


def test_rayjob_runs_the_d20_pretraining_job(rayjob):
    assert rayjob["spec"]["entrypoint"] == "python ray_jobs/pretrain.py --preset d20"
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert env["env_vars"]["NANOCHAT_BASE_DIR"]


def test_rayjob_entrypoint_script_exists():
    if not (ROOT / "ray_jobs" / "pretrain.py").is_file():
        pytest.skip("ray_jobs/pretrain.py is not in this tree yet (the training area adds it)")
    assert "--preset" in (ROOT / "ray_jobs" / "pretrain.py").read_text()


@pytest.mark.parametrize("name", ["rayjob-pretrain.yaml", "rayservice.yaml"])
def test_worker_groups_request_gpus_and_share_one_image(name):
    manifest = load_yaml(KUBERAY / name)
    spec = cluster_specs(manifest)
    images = {c["image"] for c in containers(spec)}
    assert len(images) == 1, f"head and workers must run the same image, got {images}"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert gpus >= 1
            assert int(c["resources"].get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "do not expose the head (dashboard, jobs API) publicly"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_rayjob_fills_one_8_gpu_node(rayjob):
    (group,) = cluster_specs(rayjob)["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 8 and group["replicas"] == 1


def test_rayservice_serve_config_targets_our_app_builder(rayservice):
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    jsonschema.validate(serve_config, SERVE_CONFIG_SCHEMA)
    (app,) = serve_config["applications"]
    module_name, attr = app["import_path"].split(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr))
    from nanochat.serve.app import BuildArgs

    args = BuildArgs.model_validate(app["args"])  # the builder rejects unknown keys the same way
    from nanochat.config import load_preset

    overrides = [o if o.startswith("serve.") else f"serve.{o}" for o in args.overrides]
    settings = load_preset(args.preset, overrides).serve
    group_max = sum(g["maxReplicas"] for g in cluster_specs(rayservice)["workerGroupSpecs"])
    assert settings.num_gpus == 1 and settings.max_replicas <= group_max
    assert cluster_specs(rayservice)["enableInTreeAutoscaling"] is True


def test_rayservice_requires_an_api_key_from_a_secret(rayservice):
    for c in containers(cluster_specs(rayservice)):
        env = {e["name"]: e for e in c.get("env", [])}
        assert "secretKeyRef" in env["NANOCHAT_API_KEY"]["valueFrom"]


# ---- CI workflow ------------------------------------------------------------------------------------


def test_ci_workflow_runs_the_test_command_and_ruff():
    workflow = load_yaml(ROOT / ".github" / "workflows" / "ci.yml")
    steps = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert any(".ci/run" in s for s in steps)
    assert (ROOT / ".ci" / "run").is_file()
    # .ci/run is exactly the README's test command, which lints before it tests
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "ruff check ." in (ROOT / "scripts" / "test.sh").read_text()
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()
    # a CPU runner must not pull PyPI's CUDA torch
    assert "download.pytorch.org/whl/cpu" in workflow["jobs"]["test"]["env"]["TORCH_SPEC"]


# ---- serve_configs/vllm.yaml (Ray Serve LLM) ----------------------------------------------------------


def _llm_config_class():
    """Ray Serve LLM's ``LLMConfig``: the public class when vLLM is installed; without vLLM
    ``ray.serve.llm`` does not import, so the internal class it re-exports (the one
    ``build_openai_app``'s ``LLMServingArgs`` validates each entry of ``llm_configs`` with)."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    return LLMConfig


@pytest.fixture(scope="module")
def vllm_serve_config() -> dict:
    return load_yaml(ROOT / "serve_configs" / "vllm.yaml")


def test_vllm_yaml_is_a_serve_config_of_ray_serve_llms_openai_app(vllm_serve_config):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(vllm_serve_config)
    (app,) = vllm_serve_config["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    assert set(app["args"]) == {"llm_configs"}


def test_vllm_yaml_llm_configs_pass_ray_serve_llms_own_validation(vllm_serve_config):
    llm_config = _llm_config_class()
    (app,) = vllm_serve_config["applications"]
    (raw,) = app["args"]["llm_configs"]
    config = llm_config.model_validate(raw)  # unknown keys, accelerator type, deployment_config all checked
    assert config.model_id == "nanochat-d20"
    assert config.engine_kwargs["model_impl"] == "transformers"
    # a vLLM frontend argument (Ray Serve LLM passes it on): without it vLLM sends user content as a list of
    # parts, which the exported chat template refuses (found with benchmarks/check_vllm_export.py)
    assert config.engine_kwargs["chat_template_content_format"] == "string"
    scaling = config.deployment_config["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    # the validation is strict: a misspelled field or an unknown GPU type is refused
    with pytest.raises(ValueError):
        llm_config.model_validate({**raw, "engine_kwarg": raw["engine_kwargs"]})
    with pytest.raises(ValueError):
        llm_config.model_validate({**raw, "accelerator_type": "GeForce-256"})
