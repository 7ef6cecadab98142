"""The compiled pipeline: fresh, placement per profile, resources, secrets, accelerate,
caching, the local entry point."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import placement
from pipelines.compile import COMPILED, compile_pipeline, images

GPU_STAGES = {"instructions", "rlaf", "instances", "sft", "evaluate"}
CPU_STAGES = {"plan", "shard-indices", "merge", "promote"}
TRAINING_STAGES = {"rlaf", "sft"}
CACHED_STAGES = {"instructions", "rlaf", "instances", "merge", "shard-indices"}


def _without_sdk_version(text: str) -> str:
    return re.sub(r"^sdkVersion: .*$", "", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "refine_af.yaml")
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return path, pipeline_spec, platform_spec


@pytest.fixture(scope="module")
def compiled_cpu(tmp_path_factory):
    where = placement.Placement(profile="cpu", registry="kind.local/team", tag="dev")
    path = compile_pipeline(tmp_path_factory.mktemp("cpu") / "refine_af.yaml", where)
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return path, pipeline_spec, platform_spec


def test_committed_yaml_is_fresh(compiled):
    path, _, _ = compiled
    assert _without_sdk_version(COMPILED.read_text()) == _without_sdk_version(path.read_text()), (
        "pipelines/refine_af.yaml is stale: run `python -m pipelines.compile`"
    )


def _stage(executor: str) -> str:
    return re.sub(r"^exec-|-\d+$", "", executor)


def test_every_stage_is_in_the_dag(compiled):
    _, spec, _ = compiled
    stages = {_stage(name) for name in spec["deploymentSpec"]["executors"]}
    assert stages == GPU_STAGES | CPU_STAGES


def _executors(compiled):
    _, spec, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        yield name, executor["container"], k8s[name]


def test_gpu_tasks_carry_selector_toleration_and_accelerator(compiled):
    for name, container, k8s in _executors(compiled):
        resources = container["resources"]
        assert resources["cpuLimit"] and resources["memoryLimit"], name
        assert resources["cpuRequest"] and resources["memoryRequest"], name
        assert k8s["secretAsEnv"][0]["secretName"] == "refine-af-s3", name
        assert k8s["configMapAsEnv"][0]["configMapName"] == "refine-af-endpoints", name
        if _stage(name) in GPU_STAGES:
            assert container["image"] == "ghcr.io/refine-af/runtime-gpu:0.1.0", name
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            count = "{{$.inputs.parameters['pipelinechannel--gpus']}}"
            expected = count if _stage(name) in TRAINING_STAGES else "1"
            assert resources["accelerator"]["resourceCount"] == expected, name
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}, name
            assert k8s["tolerations"] == [
                {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
            ], name
            assert k8s["emptyDirMounts"] == [
                {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"}
            ], name
        else:
            assert container["image"] == "ghcr.io/refine-af/runtime-cpu:0.1.0", name
            assert "accelerator" not in resources, name
            assert "nodeSelector" not in k8s and "tolerations" not in k8s, name


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "Mi": 2**20, "Gi": 2**30}
    for unit, factor in units.items():
        if value.endswith(unit):
            return float(value.removesuffix(unit)) * factor
    return float(value)


# Requests of what else runs on the kind node, summed from renders of KFP 2.17.0's
# env/platform-agnostic (0.57 CPU, 2.56 GiB, without Argo's controller) and of
# k8s/overlays/kind (0.55 CPU, 1.25 GiB), rounded up with room for Argo and kube-system.
KIND_NODE = {"cpu": 4.0, "memory": 8 * 2**30}
OTHERS = {"cpu": 1.5, "memory": 4.5 * 2**30}


def test_cpu_profile_fits_the_documented_kind_cluster(compiled_cpu):
    """Item 1: runtime-cpu everywhere, no accelerator, selector or toleration, and four
    model steps at once (the widest layer: stage 2 beside two baseline shards, or the two
    shard loops with 2 shards each) fit the documented 4 CPU / 8 GB next to the rest."""
    biggest = {"cpu": 0.0, "memory": 0.0}
    for name, container, k8s in _executors(compiled_cpu):
        resources = container["resources"]
        assert container["image"] == "kind.local/team/runtime-cpu:dev", name
        assert "accelerator" not in resources, name
        assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s), name
        assert _quantity(resources["resourceMemoryLimit"]) <= 4 * 2**30, name
        biggest["cpu"] = max(biggest["cpu"], _quantity(resources["resourceCpuRequest"]))
        biggest["memory"] = max(biggest["memory"], _quantity(resources["resourceMemoryRequest"]))
    for what in ("cpu", "memory"):
        assert 4 * biggest[what] + OTHERS[what] <= KIND_NODE[what], what


def test_committed_yaml_and_cpu_profile_name_their_images(compiled, compiled_cpu):
    assert images(compiled[0]) == [
        "ghcr.io/refine-af/runtime-cpu:0.1.0",
        "ghcr.io/refine-af/runtime-gpu:0.1.0",
    ]
    assert images(compiled_cpu[0]) == ["kind.local/team/runtime-cpu:dev"]


def test_gpu_settings_come_from_the_placement(tmp_path):
    """Item 7: node label, resource and taint are submit-time options, not a ConfigMap."""
    gpu = placement.Gpu(
        resource="amd.com/gpu", node_label="cloud.google.com/gke-accelerator=nvidia-h100-80gb",
        toleration="gpu:NoExecute",
    )  # fmt: skip
    path = compile_pipeline(tmp_path / "p.yaml", placement.Placement(gpu=gpu))
    spec, platform = yaml.safe_load_all(path.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-rlaf"]
    accelerator = spec["deploymentSpec"]["executors"]["exec-rlaf"]["container"]["resources"]
    assert accelerator["accelerator"]["resourceType"] == "amd.com/gpu"
    assert k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert k8s["tolerations"] == [{"effect": "NoExecute", "key": "gpu", "operator": "Exists"}]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"profile": "tpu"}, "profile must be one of"),
        ({"gpu": placement.Gpu(node_label="no-equals-sign")}, "key=value"),
        ({"gpu": placement.Gpu(toleration="gpu:Sometimes")}, "key:NoSchedule"),
    ],
)
def test_bad_placement_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        placement.Placement(**changes)


@pytest.mark.parametrize(
    ("option", "message"),
    [("--gpu-node-label", "key=value"), ("--gpu-toleration", "key:NoSchedule")],
)
def test_compile_refuses_a_malformed_gpu_option_in_one_line(tmp_path, option, message):
    out = tmp_path / "p.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--out", str(out), option, "malformed"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_model_steps_get_the_optional_hf_token(compiled):
    """Item 4: HF_TOKEN from the optional refine-af-hf Secret on every step that loads a
    model; an absent Secret does not stop the pod."""
    for name, _container, k8s in _executors(compiled):
        hf = [s for s in k8s["secretAsEnv"] if s["secretName"] == "refine-af-hf"]
        if _stage(name) in GPU_STAGES:
            assert hf == [
                {
                    "keyToEnv": [{"envVar": "HF_TOKEN", "secretKey": "HF_TOKEN"}],
                    "optional": True,
                    "secretName": "refine-af-hf",
                    "secretNameParameter": {"runtimeValue": {"constant": "refine-af-hf"}},
                }
            ], name
        else:
            assert not hf, name


def test_cached_steps_keep_the_run_specific_parent_out_of_their_inputs(compiled):
    """Item 9: KFP's cache key holds a step's input parameters and artifacts; the MLflow
    parent run id changes every run, so cached steps must not take it. They find the parent
    through the pod's workflow label instead."""
    _, spec, _ = compiled
    components = spec["components"]
    seen = set()
    for name, _container, k8s in _executors(compiled):
        stage = _stage(name)
        component = components[name.replace("exec-", "comp-", 1)]
        inputs = component.get("inputDefinitions", {}).get("parameters", {})
        if stage in CACHED_STAGES:
            seen.add(stage)
            assert "parent_run_id" not in inputs, name
        assert {"fieldPath": "metadata.labels['workflows.argoproj.io/workflow']",
                "name": "REFINE_AF_PIPELINE_RUN"} in k8s["fieldPathAsEnv"], name  # fmt: skip
    assert seen == CACHED_STAGES
    for task in _all_tasks(spec):
        stage = _stage(task["componentRef"]["name"].replace("comp-", ""))
        assert task.get("cachingOptions", {}).get("enableCache", False) == (
            stage in CACHED_STAGES
        ), stage


def _all_tasks(spec):
    for dag in [
        spec["root"]["dag"],
        *(c["dag"] for c in spec["components"].values() if "dag" in c),
    ]:
        yield from dag["tasks"].values()


def test_training_steps_run_under_accelerate_launch(compiled, compiled_cpu):
    """Item 3: stages 2 and 4 get `processes` = the `gpus` parameter on the gpu profile,
    one process on the cpu profile, and launch the stage with accelerate."""
    for compiled_spec, expected in ((compiled, "gpus"), (compiled_cpu, None)):
        for task in _all_tasks(compiled_spec[1]):
            stage = _stage(task["componentRef"]["name"].replace("comp-", ""))
            if stage not in TRAINING_STAGES:
                continue
            value = task["inputs"]["parameters"]["processes"]
            if expected:
                assert value["componentInputParameter"].endswith(expected), value
            else:
                assert value == {"runtimeValue": {"constant": 1}}, value
    for stage in TRAINING_STAGES:
        source = Path(__file__).parents[2].joinpath("components", stage, "component.py").read_text()
        assert "launch.run_stage(processes" in source


def test_no_credential_is_a_parameter(compiled):
    _, spec, _ = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {
        "config", "overrides", "base_model", "shards", "run_baseline", "gpus",
        "generation_endpoint",
    }  # fmt: skip
    text = COMPILED.read_text()
    assert "AWS_SECRET_ACCESS_KEY=" not in text and "password" not in text.lower()


def test_images_are_pinned_and_overridable(tmp_path):
    env = {"REFINE_AF_IMAGE_REGISTRY": "registry.example/team", "PATH": "/usr/bin:/bin"}
    out = tmp_path / "p.yaml"
    subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--out", str(out)],
        check=True,
        env=env,
        cwd=Path(__file__).parents[2],
    )
    images = set(re.findall(r"image: (\S+)", out.read_text()))
    assert images == {
        "registry.example/team/runtime-cpu:0.1.0",
        "registry.example/team/runtime-gpu:0.1.0",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "no-such-preset"], "unknown preset"),
        (["--set", "stage1.nope=1"], "unknown config key stage1.nope"),
        (["--shards", "0"], "--shards must be at least 1"),
    ],
)
def test_bad_input_stops_before_any_component(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.run_local", "--workspace", str(tmp_path / "w"), *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "w").exists()


def test_model_cache_is_one_claim_shared_by_the_model_steps(tmp_path):
    """Item 12: with a model cache, every model step mounts the same claim (a fixed name,
    so the cache key does not change) and keeps HF_HOME and refine-af's cache on it."""
    where = placement.Placement(model_cache="refine-af-models")
    path = compile_pipeline(tmp_path / "p.yaml", where)
    spec, platform = yaml.safe_load_all(path.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        mounts = k8s[name].get("pvcMount", [])
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        if _stage(name) in GPU_STAGES:
            assert [m["constant"] for m in mounts] == ["refine-af-models"], name
            assert mounts[0]["mountPath"] == "/models", name
            assert env == {"HF_HOME": "/models/huggingface", "REFINE_AF_CACHE": "/models/refine-af"}
        else:
            assert not mounts and not env, name
    committed = COMPILED.read_text()
    assert "pvcMount" not in committed and "HF_HOME" not in committed


def test_served_generation_moves_base_model_generation_off_gpus(tmp_path):
    """With a serving engine, stage 1 and the base-policy shards are small CPU pods;
    training and the adapter steps (RL-policy shards, stage 5) keep their GPUs."""
    where = placement.Placement(served_generation=True)
    path = compile_pipeline(tmp_path / "served.yaml", where)
    spec, platform = yaml.safe_load_all(path.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    on_gpus, clients = set(), set()
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources", {})
        if "accelerator" in resources:
            assert "nodeSelector" in k8s[name], name
            on_gpus.add(name)
        elif _stage(name) in GPU_STAGES:
            assert executor["container"]["image"].endswith("/runtime-cpu:0.1.0"), name
            assert resources["resourceCpuLimit"] == "2", name
            assert "nodeSelector" not in k8s[name] and "tolerations" not in k8s[name], name
            clients.add(name)
    assert {_stage(n) for n in clients} == {"instructions", "instances"}
    assert {_stage(n) for n in on_gpus} == {"rlaf", "sft", "instances", "evaluate"}
    # one instances executor per policy: the base policy's is the client
    assert len([n for n in clients if _stage(n) == "instances"]) == 1
