"""KubeRay manifests in k8s/: the fields KubeRay (apiVersion ray.io/v1) needs, images pinned to this
project's Ray, GPU limits on GPU groups, S3 storage in every stage's entrypoint, entrypoint flags the
real ``ray-suti`` parser accepts, and a RayService whose serveConfigV2 mirrors serve/config.yaml.
``check_manifest`` is also run on copies with a required field removed, which it must reject.
No cluster, no kubectl: YAML only.
"""
from __future__ import annotations

import copy
import inspect
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
RAY_VERSION = "2.60.0"
IMAGE_RE = re.compile(rf"^rayproject/ray:{re.escape(RAY_VERSION)}(-py311)?(-gpu|-cu\d+)?$")
RAY_KINDS = {"RayJob", "RayService", "RayCluster"}
STAGES = {"build_dataset", "apprentice", "train", "evaluate"}


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def need(cond, what: str) -> None:
    if not cond:
        raise ValueError(what)


def entry_args(entrypoint: str) -> tuple[str, list[str]]:
    """'python jobs/<stage>.py ARGS && ...' -> (stage, ARGS as the CLI sees them)."""
    first = entrypoint.split("&&")[0]
    words = shlex.split(first)
    need(len(words) >= 2 and words[0] == "python" and re.fullmatch(r"jobs/\w+\.py", words[1]),
         f"entrypoint must start with 'python jobs/<stage>.py', got {first[:60]!r}")
    return Path(words[1]).stem, words[2:]


def check_pod_template(template: dict, where: str, gpu: bool) -> None:
    need(isinstance(template, dict) and "spec" in template, f"{where}: template.spec missing")
    containers = template["spec"].get("containers")
    need(containers, f"{where}: template.spec.containers missing")
    for c in containers:
        need(c.get("name"), f"{where}: container without a name")
        need(IMAGE_RE.match(c.get("image", "")), f"{where}: image {c.get('image')!r} is not rayproject/ray:{RAY_VERSION}")
        res = c.get("resources", {})
        limits, requests = res.get("limits", {}), res.get("requests", {})
        need(limits.get("cpu") and limits.get("memory"), f"{where}: cpu/memory limits missing")
        n = int(limits.get("nvidia.com/gpu", 0))
        if gpu:
            need(n >= 1, f"{where}: GPU group without an nvidia.com/gpu limit")
            need(int(requests.get("nvidia.com/gpu", n)) == n, f"{where}: GPU request differs from its limit")
        else:
            need(n == 0, f"{where}: CPU-only pod asks for GPUs")


def check_cluster_spec(spec: dict, where: str) -> None:
    need(isinstance(spec, dict), f"{where}: cluster spec missing")
    need(str(spec.get("rayVersion")) == RAY_VERSION, f"{where}: rayVersion must be {RAY_VERSION}")
    head = spec.get("headGroupSpec")
    need(isinstance(head, dict), f"{where}: headGroupSpec missing")
    need("rayStartParams" in head, f"{where}: headGroupSpec.rayStartParams missing")
    need(str(head["rayStartParams"].get("num-cpus")) == "0", f"{where}: the head must start with num-cpus 0")
    check_pod_template(head.get("template"), f"{where}.headGroupSpec", gpu=False)
    groups = spec.get("workerGroupSpecs")
    need(groups, f"{where}: workerGroupSpecs missing")
    for g in groups:
        name = g.get("groupName")
        need(name, f"{where}: worker group without groupName")
        for key in ("replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            need(key in g, f"{where}.{name}: {key} missing")
        need(0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}.{name}: need min <= replicas <= max")
        check_pod_template(g["template"], f"{where}.{name}", gpu="gpu" in name)


def gpus_in(spec: dict) -> int:
    total = 0
    for g in spec["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            total += g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    return total


def check_manifest(doc: dict, fname: str = "?") -> None:
    for key in ("apiVersion", "kind", "metadata"):
        need(key in doc, f"{fname}: {key} missing")
    need(doc["metadata"].get("name"), f"{fname}: metadata.name missing")
    kind = doc["kind"]
    if kind not in RAY_KINDS:
        return
    need(doc["apiVersion"] == "ray.io/v1", f"{fname}: apiVersion must be ray.io/v1")
    spec = doc.get("spec")
    need(isinstance(spec, dict), f"{fname}: spec missing")
    if kind == "RayJob":
        entry = spec.get("entrypoint")
        need(isinstance(entry, str) and entry.strip(), f"{fname}: spec.entrypoint missing")
        entry_args(entry)
        need("s3://" in entry, f"{fname}: the entrypoint reads or writes no s3:// storage")
        need(spec.get("shutdownAfterJobFinishes") is True, f"{fname}: shutdownAfterJobFinishes must be true")
        env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
        need("working_dir" in env, f"{fname}: runtimeEnvYAML needs the tagged working_dir (jobs/, serve/)")
        check_cluster_spec(spec.get("rayClusterSpec"), f"{fname}.rayClusterSpec")
    elif kind == "RayService":
        raw = spec.get("serveConfigV2")
        need(isinstance(raw, str), f"{fname}: serveConfigV2 must be a YAML string")
        serve_cfg = yaml.safe_load(raw)
        apps = (serve_cfg or {}).get("applications")
        need(apps, f"{fname}: serveConfigV2 has no applications")
        for app in apps:
            need(app.get("import_path"), f"{fname}: application without import_path")
            need(app.get("name") and app.get("route_prefix"), f"{fname}: application name/route_prefix missing")
        check_cluster_spec(spec.get("rayClusterConfig"), f"{fname}.rayClusterConfig")


# ---------------------------------------------------------------------------------------- passes


def test_every_manifest_is_complete():
    docs = manifests()
    assert docs, "no YAML in k8s/"
    for fname, doc in docs:
        check_manifest(doc, fname)


def test_a_rayjob_per_stage_and_a_rayservice():
    kinds = [doc["kind"] for _, doc in manifests()]
    stages = {entry_args(doc["spec"]["entrypoint"])[0] for _, doc in manifests() if doc["kind"] == "RayJob"}
    assert stages >= STAGES
    assert kinds.count("RayService") == 1


def test_entrypoint_flags_parse_with_the_real_cli():
    from ray_suti.cli import build_parser

    parser = build_parser()
    commands = {"build_dataset": ["build-dataset"], "apprentice": ["apprentice"], "train": ["train"],
                "evaluate": ["evaluate"], "pretrain": ["pretrain"]}
    for fname, doc in manifests():
        if doc["kind"] != "RayJob":
            continue
        stage, args = entry_args(doc["spec"]["entrypoint"])
        parsed = vars(parser.parse_args(commands[stage] + args))  # SystemExit on an unknown flag or bad value
        # S3 only, no shared volume: every path a stage is given is a URI
        paths = {k: v for k, v in parsed.items() if isinstance(v, str) and "/" in v}
        assert paths and all(v.startswith("s3://") for v in paths.values()), (fname, paths)


def test_train_uses_zero3_across_nodes_on_every_gpu():
    (doc,) = [d for _, d in manifests() if d["kind"] == "RayJob" and entry_args(d["spec"]["entrypoint"])[0] == "train"]
    from ray_suti.cli import build_parser

    args = build_parser().parse_args(["train"] + entry_args(doc["spec"]["entrypoint"])[1])
    cluster = doc["spec"]["rayClusterSpec"]
    assert args.zero_stage == 3 and args.use_gpu
    assert args.storage_path.startswith("s3://")
    assert args.num_workers == gpus_in(cluster)  # one Ray Train worker per GPU
    assert sum(g["replicas"] for g in cluster["workerGroupSpecs"]) > 1  # across nodes
    assert args.num_workers * args.cpus_per_worker <= sum(
        g["replicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for g in cluster["workerGroupSpecs"])


def test_rayservice_mirrors_serve_config():
    from ray_suti.serving.app import build_app

    (doc,) = [d for _, d in manifests() if d["kind"] == "RayService"]
    app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == local[key], key
    assert set(app["args"]) <= set(inspect.signature(build_app).parameters)
    assert set(local["args"]) - {"allow_anonymous"} <= set(app["args"])
    assert "allow_anonymous" not in app["args"] and "token" not in app["args"]  # keys from the mounted secret
    assert app["args"]["api_keys_file"].startswith("/etc/ray-suti/")
    assert app["args"]["num_gpus"] >= 1
    assert app["args"]["min_replicas"] <= app["args"]["max_replicas"]
    assert app["args"]["store"].startswith("s3://")  # replicas on many nodes share one store
    assert app["args"]["checkpoint"].startswith("s3://")
    for spec in [doc["spec"]["rayClusterConfig"]["headGroupSpec"]] + doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        volumes = spec["template"]["spec"]["volumes"]  # the API keys' secret, read-only; nothing else
        assert [v["secret"]["secretName"] for v in volumes] == ["ray-suti-api-keys"]
        assert spec["template"]["spec"]["containers"][0]["volumeMounts"][0]["readOnly"]
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sum(g["maxReplicas"] for g in groups if "gpu" in g["groupName"]) >= app["args"]["max_replicas"]
    assert "working_dir" in app["runtime_env"]  # serve/ is not in the wheel


# ---------------------------------------------------------------------------------------- fails


def _drop(doc: dict, path: tuple):
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


def _first(kind: str) -> dict:
    return copy.deepcopy(next(d for _, d in manifests() if d["kind"] == kind))


@pytest.mark.parametrize("kind, path, message", [
    ("RayJob", ("spec", "entrypoint"), "entrypoint"),
    ("RayJob", ("metadata", "name"), "metadata.name"),
    ("RayJob", ("apiVersion",), "apiVersion"),
    ("RayJob", ("spec", "rayClusterSpec", "headGroupSpec"), "headGroupSpec"),
    ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "groupName"), "groupName"),
    ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "image"), "image"),
    ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
                "resources", "limits", "nvidia.com/gpu"), "nvidia.com/gpu"),
    ("RayJob", ("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), "num-cpus"),
    ("RayService", ("spec", "serveConfigV2"), "serveConfigV2"),
    ("RayService", ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"), "maxReplicas"),
])
def test_a_copy_with_a_required_field_removed_fails(tmp_path, kind, path, message):
    doc = _first(kind)
    if kind == "RayJob":  # the first RayJob's first group must be a GPU group for the GPU case
        doc = copy.deepcopy(next(d for _, d in manifests() if d["kind"] == "RayJob"
                                 and "gpu" in d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]))
    _drop(doc, path)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises((ValueError, KeyError)) as err:
        check_manifest(yaml.safe_load(broken.read_text()), broken.name)
    assert message in str(err.value)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace("s3://", "/tmp/")), "s3://"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(image="rayproject/ray:2.59.0-py311-gpu"), "image"),
    (lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.59.0"), "rayVersion"),
    (lambda d: d["spec"].update(entrypoint="ray-suti train --data x"), "jobs/<stage>.py"),
])
def test_a_copy_with_a_wrong_value_fails(mutate, message):
    doc = _first("RayJob")
    mutate(doc)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_manifest(doc)


def test_serve_config_without_import_path_fails():
    doc = _first("RayService")
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    del cfg["applications"][0]["import_path"]
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    with pytest.raises(ValueError, match="import_path"):
        check_manifest(doc)


def test_a_misspelled_flag_fails_the_cli_check():
    from ray_suti.cli import build_parser

    doc = _first("RayJob")
    stage, args = entry_args(doc["spec"]["entrypoint"].replace("--output", "--ouptut", 1).replace("--clusters", "--clustres", 1)
                             .replace("--data ", "--dta ", 1).replace("--checkpoint", "--chekpoint", 1))
    with pytest.raises(SystemExit):
        build_parser().parse_args([stage.replace("_", "-")] + args)
