"""The compiled pipeline: fresh, GPU placement, resources, secrets, the local entry point."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.compile import COMPILED, compile_pipeline

GPU_STAGES = {"instructions", "rlaf", "instances", "sft", "evaluate"}
CPU_STAGES = {"plan", "shard-indices", "merge", "promote"}


def _without_sdk_version(text: str) -> str:
    return re.sub(r"^sdkVersion: .*$", "", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "refine_af.yaml")
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


def test_gpu_tasks_carry_selector_toleration_and_accelerator(compiled):
    _, spec, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = spec["deploymentSpec"]["executors"]
    for name, container in containers.items():
        resources = container["container"]["resources"]
        k8s = executors[name]
        assert resources["cpuLimit"] and resources["memoryLimit"], name
        assert resources["cpuRequest"] and resources["memoryRequest"], name
        assert k8s["secretAsEnv"][0]["secretName"] == "refine-af-s3", name
        assert k8s["configMapAsEnv"][0]["configMapName"] == "refine-af-endpoints", name
        if _stage(name) in GPU_STAGES:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert resources["accelerator"]["resourceCount"] == "1", name
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}, name
            assert k8s["tolerations"] == [
                {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
            ], name
        else:
            assert "accelerator" not in resources, name
            assert "nodeSelector" not in k8s and "tolerations" not in k8s, name


def test_no_credential_is_a_parameter(compiled):
    _, spec, _ = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {"config", "overrides", "base_model", "shards", "run_baseline"}
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
