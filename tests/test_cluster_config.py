"""cluster.yaml (``ray up``) checked offline against Ray's own autoscaler validation.

``ray up`` runs ``prepare_config`` (merge with the provider's defaults.yaml, setup commands, per-type
worker counts) and then ``validate_config`` (ray-schema.json plus cross-field checks) before it asks
the cloud anything. The test runs the same two functions, from the installed ray package, with boto3
blocked, so nothing here can reach AWS. Ray's schema does not compare a type's min_workers with its
max_workers, nor resources with the instance type: ``check_node_types`` below does, with a small
table of the instance types this project uses.
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY_VERSION = "2.60.0"
IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"

# EC2 instance type -> (vCPUs, GPUs, GPU memory GiB per GPU); from AWS's instance type pages.
INSTANCES = {
    "m6i.2xlarge": (8, 0, 0),
    "c6i.8xlarge": (32, 0, 0),
    "g5.xlarge": (4, 1, 24),  # A10G
    "g5.2xlarge": (8, 1, 24),
    "g6e.xlarge": (4, 1, 48),  # L40S
    "g6e.2xlarge": (8, 1, 48),
    "p4d.24xlarge": (96, 8, 40),  # A100 40 GB
    "p4de.24xlarge": (96, 8, 80),
    "p5.48xlarge": (192, 8, 80),  # H100 80 GB
}
# What each worker type is for: the fewest GPUs per node and GPU memory it needs (docs/scaling.md).
ROLES = {"cpu_decode": (0, 0), "gpu_1": (1, 24), "gpu_train": (8, 40)}


@pytest.fixture(autouse=True)
def no_cloud(monkeypatch):
    """Importing boto3/botocore fails inside these tests: validation must stay offline."""
    for name in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, name, None)


def load(path: Path = CLUSTER_YAML) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_validate(config: dict) -> dict:
    """What ``ray up`` does to the file before contacting the provider."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def check_node_types(config: dict) -> None:
    """Project rules Ray's schema leaves out; raises ValueError naming the node type."""
    types = config["available_node_types"]
    head = config["head_node_type"]
    for name, spec in types.items():
        instance = spec["node_config"].get("InstanceType")
        if instance not in INSTANCES:
            raise ValueError(f"{name}: instance type {instance!r} is not in the test's table")
        cpus, gpus, _ = INSTANCES[instance]
        res = spec["resources"]
        if name == head:
            if res.get("CPU") != 0 or res.get("GPU", 0) != 0:
                raise ValueError(f"{name}: the head must advertise CPU 0 and GPU 0, got {res}")
            continue
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers")
        if hi is None or not 0 <= lo <= hi:
            raise ValueError(f"{name}: need 0 <= min_workers <= max_workers, got {lo}..{hi}")
        if res.get("CPU") != cpus:
            raise ValueError(f"{name}: CPU {res.get('CPU')} but {instance} has {cpus} vCPUs")
        if res.get("GPU", 0) != gpus:
            raise ValueError(f"{name}: GPU {res.get('GPU', 0)} but {instance} has {gpus} GPUs")
        if name in ROLES:
            need_gpus, need_mem = ROLES[name]
            if gpus < need_gpus or INSTANCES[instance][2] < need_mem:
                raise ValueError(f"{name}: {instance} has {gpus} x {INSTANCES[instance][2]} GiB, "
                                 f"the role needs {need_gpus} x {need_mem} GiB")
    if sum(s.get("max_workers", 0) for n, s in types.items() if n != head) > config["max_workers"]:
        raise ValueError("the global max_workers caps the worker types below their max_workers")


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def pyproject_pins() -> tuple[str, list[str]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["version"], list(project["dependencies"])


# ---------------------------------------------------------------------------------------- passes


def test_ray_validator_accepts_cluster_yaml():
    prepared = ray_validate(load())
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) >= {"head", "gpu_1", "gpu_train"}
    assert prepared["available_node_types"]["head"]["max_workers"] == 0  # filled in by prepare_config


def test_node_types_match_their_instances_and_roles():
    config = load()
    check_node_types(config)
    types = config["available_node_types"]
    assert types["gpu_train"]["resources"]["GPU"] == 8
    assert types["gpu_1"]["resources"]["GPU"] == 1


def test_head_schedules_no_gpu_or_cpu_work():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert INSTANCES[head["node_config"]["InstanceType"]][1] == 0  # and it has no GPU to waste


def test_image_matches_installed_ray_and_python():
    import ray

    config = load()
    assert config["docker"]["image"] == IMAGE
    assert ray.__version__ == RAY_VERSION
    _, deps = pyproject_pins()
    assert f"ray[train,serve,data]=={RAY_VERSION}" in deps
    assert "-py311-" in IMAGE and sys.version_info[:2] == (3, 11)


def test_setup_installs_the_pinned_project_and_pyproject_pins():
    config = load()
    version, deps = pyproject_pins()
    setup = " ".join(config["setup_commands"])
    for dep in deps:  # every exact pin, verbatim
        assert f'"{dep}"' in setup, f"{dep} missing from setup_commands"
    assert re.search(rf'"ray-suti @ git\+https://github\.com/[A-Za-z0-9_.-]+/ray-suti@v{re.escape(version)}"', setup)
    assert f"--branch v{version}" in setup  # the clone (jobs/, serve/) is the same tag


def test_storage_and_iam_placeholders():
    config = load()
    run_options = " ".join(config["docker"]["run_options"])
    assert re.search(r"RAY_SUTI_STORAGE=s3://[^/\s]+/ray-suti", run_options)
    assert "-v " not in run_options and not load()["initialization_commands"]  # S3 only: no shared file system to mount
    for name, spec in config["available_node_types"].items():
        arn = spec["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name


# ---------------------------------------------------------------------------------------- fails


def test_ray_validator_rejects_a_misspelled_required_key(tmp_path):
    broken = load()
    gpu = broken["available_node_types"]["gpu_1"]
    gpu["node_confg"] = gpu.pop("node_config")  # required key misspelled
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(load(write(tmp_path, broken)))


def test_ray_validator_rejects_an_unknown_top_level_key(tmp_path):
    broken = load()
    broken["availible_node_types"] = broken.pop("available_node_types")
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        ray_validate(load(write(tmp_path, broken)))


def test_ray_validator_rejects_min_workers_above_the_global_max(tmp_path):
    broken = load()
    broken["available_node_types"]["gpu_train"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        ray_validate(load(write(tmp_path, broken)))


def test_ray_validator_rejects_a_non_integer_resource(tmp_path):
    broken = load()
    broken["available_node_types"]["gpu_1"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(load(write(tmp_path, broken)))


def test_ray_validator_rejects_an_unknown_head_type(tmp_path):
    broken = load()
    broken["head_node_type"] = "haed"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(load(write(tmp_path, broken)))


@pytest.mark.parametrize("node_type, field, value, message", [
    ("gpu_1", "min_workers", 100, "min_workers <= max_workers"),  # min 100 > max 96 (Ray's schema allows it)
    ("gpu_train", "resources", {"CPU": 96, "GPU": 4}, "has 8 GPUs"),
    ("gpu_1", "resources", {"CPU": 4, "GPU": 1}, "has 8 vCPUs"),
    ("head", "resources", {"CPU": 0}, None),  # GPU left for autodetection: allowed (m6i has none)
    ("head", "resources", {}, "CPU 0 and GPU 0"),  # autodetected CPUs would schedule work on the head
])
def test_project_checks_reject_inconsistent_node_types(tmp_path, node_type, field, value, message):
    broken = load()
    broken["available_node_types"][node_type][field] = value
    broken = load(write(tmp_path, broken))
    if message is None:
        check_node_types(broken)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        check_node_types(broken)


def test_project_checks_reject_a_gpu_type_too_small_for_its_role(tmp_path):
    broken = load()
    broken["available_node_types"]["gpu_train"]["node_config"]["InstanceType"] = "g5.2xlarge"
    broken["available_node_types"]["gpu_train"]["resources"] = {"CPU": 8, "GPU": 1}
    with pytest.raises(ValueError, match="the role needs"):
        check_node_types(load(write(tmp_path, broken)))
