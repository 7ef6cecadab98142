"""Stage 6 against a real MLflow server whose artifact store is S3 (moto), and the CLI."""

import os
import socket
import uuid
from pathlib import Path

import boto3
import mlflow
import pytest
from cli_runner import run_cli

from refine_af import tracking
from refine_af.errors import InputError
from refine_af.stages import register
from refine_af.superni import EvaluationResult, TaskResult

pytestmark = pytest.mark.integration
TASKS = ("t1", "t2", "t3", "t4")


@pytest.fixture
def registry(
    mlflow_s3_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> mlflow.MlflowClient:
    url, _ = mlflow_s3_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("REFINE_AF_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("COLUMNS", "200")  # rich tables print unwrapped
    return tracking.connect(tmp_path / "ws")


@pytest.fixture
def model_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered model of its own per test, named to the CLI through stage6.model_name."""
    name = f"refine-af-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TEST_MODEL_NAME", name)
    return name


def register_folder(client: mlflow.MlflowClient, name: str, folder: Path) -> str:
    """A version made of plain artifacts: the registry API does not care how it was made."""
    with tracking.stage_run("finetune", Path("unused-with-a-server")) as run:
        mlflow.log_artifacts(str(folder), "model", run_id=run.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name, f"runs:/{run.run_id}/model", run.run_id).version


def evaluation(scores: tuple[float, ...], tmp_path: Path) -> EvaluationResult:
    """An evaluation result logged to its own run, as stage 5 logs one."""
    tasks = {
        t: TaskResult(rougeL=s, instances=5, ids_sha256=f"ids-{t}")
        for t, s in zip(TASKS, scores, strict=True)
    }
    mean = sum(scores) / len(scores)
    with tracking.stage_run("evaluate", tmp_path) as run:
        result = EvaluationResult(
            model="m", data="d", rougeL=mean, rougeL_instances=mean, tasks=tasks,
            mlflow_run_id=run.run_id, mlflow_artifact="candidate/evaluation.json",
        )  # fmt: skip
        run.log_dict(result.model_dump(mode="json"), "candidate/evaluation.json")
    return result


def registry_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``refine-af`` in-process on this test's registered model; returns the exit code."""
    name = os.environ.get("TEST_MODEL_NAME")
    return run_cli(monkeypatch, *args, *(["--set", f"stage6.model_name={name}"] if name else []))


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    """Every object key the MLflow server wrote to the bucket, read with boto3 directly."""
    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2")
    return [
        item["Key"] for page in pages.paginate(Bucket=bucket) for item in page.get("Contents", [])
    ]


def state(client: mlflow.MlflowClient, name: str) -> dict:
    """Everything promote may change: aliases and every version's tags and timestamps."""
    versions = client.search_model_versions(f"name = '{name}'")
    return {
        "aliases": client.get_registered_model(name).aliases,
        "versions": {v.version: (v.tags, v.last_updated_timestamp) for v in versions},
    }


def test_registered_model_files_are_in_the_bucket(
    registry: mlflow.MlflowClient,
    model_name: str,
    mlflow_s3_server: tuple[str, str],
    s3_server: str,
    tiny_lora_adapter_dir: Path,
) -> None:
    version = register_folder(registry, model_name, tiny_lora_adapter_dir)
    assert registry.get_model_version(model_name, version).status == "READY"
    keys = bucket_keys(s3_server, mlflow_s3_server[1])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert any(key.endswith(f"/model/{name}") for key in keys), keys


def register_run(
    client: mlflow.MlflowClient,
    name: str,
    folder: Path,
    tmp_path: Path,
    challenger: tuple[float, ...],
    baseline: tuple[float, ...] | None,
) -> tuple[str, str | None]:
    """One pipeline run in the registry: its RL version and its no-RL baseline, evaluated."""
    rl = register_folder(client, name, folder)
    client.set_model_version_tag(name, rl, register.POLICY_TAG, "rl")
    base = None
    if baseline is not None:
        base = register_folder(client, name, folder)
        client.set_model_version_tag(name, base, register.POLICY_TAG, "base")
        register.mark_baseline(client, name, base, evaluation(baseline, tmp_path))
    register.mark_challenger(client, name, rl, evaluation(challenger, tmp_path), base)
    return rl, base


def aliases_of(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def test_challenger_that_loses_to_its_baseline_on_a_fresh_registry_is_rejected(
    registry: mlflow.MlflowClient,
    model_name: str,
    tiny_lora_adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rl, base = register_run(
        registry, model_name, tiny_lora_adapter_dir, tmp_path, (45, 30, 30, 40), (40, 40, 40, 40)
    )
    assert aliases_of(registry, model_name) == {"challenger": rl, "baseline": base}
    assert registry_cli(monkeypatch, "promote") == 1
    captured = capsys.readouterr()
    assert "gate failed" in captured.err and "there is no champion" in captured.err
    assert "25.0% of tasks improved over the baseline" in captured.err
    assert "champion" not in aliases_of(registry, model_name)
    tags = registry.get_model_version(model_name, rl).tags
    assert tags["refine_af.promotion.decision"] == "rejected"
    assert tags["refine_af.promotion.against"] == f"baseline v{base}"
    assert tags["refine_af.promotion.baseline.version"] == base
    assert tags["refine_af.promotion.baseline.pct_tasks_improved"] == "25.00"
    assert tags["refine_af.promotion.baseline.tasks"] == "1 improved, 1 tied, 2 worse of 4"
    assert tags["refine_af.promotion.gate"] == "min_pct_tasks_improved=50, max_mean_drop=0"
    assert tags["refine_af.promotion.summary"].startswith(
        f"rejected: 25.0% of tasks improved over the baseline v{base} (1 of 4, 1 tied), "
        "gate needs ≥ 50%; mean ROUGE-L 36.25 vs 40.00"
    )
    before = state(registry, model_name)
    assert registry_cli(monkeypatch, "promote") == 1
    assert state(registry, model_name) == before  # a repeated rejection writes nothing

    # A baseline is a reference, not a candidate.
    assert registry_cli(monkeypatch, "promote", "--version", base) == 2
    assert "is a no-RL baseline" in capsys.readouterr().err


def test_challenger_that_beats_its_baseline_is_promoted(
    registry: mlflow.MlflowClient,
    model_name: str,
    tiny_lora_adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rl, base = register_run(
        registry, model_name, tiny_lora_adapter_dir, tmp_path, (50, 45, 41, 39), (40, 40, 40, 40)
    )
    assert registry_cli(monkeypatch, "promote") == 0
    assert aliases_of(registry, model_name) == {"challenger": rl, "baseline": base, "champion": rl}
    tags = registry.get_model_version(model_name, rl).tags
    assert tags["refine_af.promotion.decision"] == "promoted"
    assert tags["refine_af.promotion.baseline.pct_tasks_improved"] == "75.00"
    assert tags["refine_af.promotion.baseline.tasks"] == "3 improved, 0 tied, 1 worse of 4"
    assert "refine_af.promotion.champion.version" not in tags
    assert tags["refine_af.promotion.eval_run_id"] == tags["refine_af.eval.run_id"]
    assert tags["refine_af.promotion.summary"].startswith(
        f"promoted: 75.0% of tasks improved over the baseline v{base}"
    )

    # Promoting the champion again changes nothing.
    before = state(registry, model_name)
    assert registry_cli(monkeypatch, "promote") == 0
    assert state(registry, model_name) == before


def test_winner_over_its_baseline_that_loses_to_the_champion_is_rejected(
    registry: mlflow.MlflowClient,
    model_name: str,
    tiny_lora_adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tiny_lora_adapter_dir
    champion, _ = register_run(
        registry, model_name, folder, tmp_path, (50, 45, 41, 39), (40, 40, 40, 40)
    )
    assert registry_cli(monkeypatch, "promote") == 0
    rl, base = register_run(
        registry, model_name, folder, tmp_path, (35, 35, 35, 35), (30, 30, 30, 30)
    )
    capsys.readouterr()
    assert registry_cli(monkeypatch, "promote") == 1
    err = capsys.readouterr().err
    assert f"champion is still version {champion}" in err
    assert "0.0% of tasks improved over the champion" in err
    assert "over the baseline" not in err  # the unmet conditions only
    assert aliases_of(registry, model_name) == {
        "challenger": rl, "baseline": base, "champion": champion,
    }  # fmt: skip
    tags = registry.get_model_version(model_name, rl).tags
    assert tags["refine_af.promotion.decision"] == "rejected"
    assert tags["refine_af.promotion.against"] == f"baseline v{base}, champion v{champion}"
    assert tags["refine_af.promotion.baseline.pct_tasks_improved"] == "100.00"
    assert tags["refine_af.promotion.champion.pct_tasks_improved"] == "0.00"
    assert tags["refine_af.promotion.champion.version"] == champion

    capsys.readouterr()
    assert registry_cli(monkeypatch, "models", "list") == 0
    listing = capsys.readouterr().out
    assert "100.0% improved (v" in listing and "0.0% improved (v" in listing
    assert "baseline" in listing and "rejected" in listing


def test_nothing_to_beat_is_rejected_unless_forced_with_a_reason(
    registry: mlflow.MlflowClient,
    model_name: str,
    tiny_lora_adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rl, _ = register_run(registry, model_name, tiny_lora_adapter_dir, tmp_path, (40,) * 4, None)
    assert registry_cli(monkeypatch, "promote") == 1
    assert "nothing to beat" in capsys.readouterr().err
    tags = registry.get_model_version(model_name, rl).tags
    assert tags["refine_af.promotion.decision"] == "rejected"
    assert tags["refine_af.promotion.against"] == "none"

    assert registry_cli(monkeypatch, "promote", "--force") == 2  # --force needs a reason
    assert registry_cli(monkeypatch, "promote", "--force", "--reason", "first model") == 0
    assert registry.get_model_version_by_alias(model_name, "champion").version == rl
    tags = registry.get_model_version(model_name, rl).tags
    assert tags["refine_af.promotion.decision"] == "forced"
    assert tags["refine_af.promotion.reason"].startswith("forced: first model")

    capsys.readouterr()
    assert registry_cli(monkeypatch, "models", "list") == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "forced" in listing
    assert "rejected" not in listing  # the rejection was superseded by the forced promotion


def test_stage_evaluate_marks_the_registered_version_challenger(
    registry: mlflow.MlflowClient,
    model_name: str,
    mlflow_s3_server: tuple[str, str],
    s3_server: str,
    tiny_causal_lm_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = register_folder(registry, model_name, tiny_causal_lm_dir)
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        '{"task": "t", "id": "t-1", "definition": "Say yes.", "input": "", "references": ["yes"]}\n'
    )
    common = [
        "stage", "evaluate", "--model", str(tiny_causal_lm_dir), "--data", str(data),
        "--set", f"model.base={tiny_causal_lm_dir}", "--set", "stage5.max_new_tokens=2",
    ]  # fmt: skip
    assert registry_cli(monkeypatch, *common, "--out", str(tmp_path / "x"), "--version", "999") == 2
    assert not (tmp_path / "x").exists()

    evaluated = ["--out", str(tmp_path / "eval"), "--version", version]
    assert registry_cli(monkeypatch, *common, *evaluated) == 0
    mv = registry.get_model_version_by_alias(model_name, "challenger")
    assert mv.version == version
    assert mv.tags["refine_af.eval.tasks"] == "1"
    run_id = mv.tags["refine_af.eval.run_id"]
    assert registry.get_run(run_id).info.run_name == "evaluate"
    key_suffix = f"{run_id}/artifacts/candidate/evaluation.json"
    assert any(k.endswith(key_suffix) for k in bucket_keys(s3_server, mlflow_s3_server[1]))

    # The run's baseline: its version gets its own scores and the baseline alias, and the
    # challenger names it for the gate.
    base = register_folder(registry, model_name, tiny_causal_lm_dir)
    linked = [*common, "--out", str(tmp_path / "pair"), "--version", version]
    assert registry_cli(monkeypatch, *linked, "--baseline-version", base) == 2  # needs --baseline
    linked += ["--baseline", str(tiny_causal_lm_dir), "--baseline-version", base]
    assert registry_cli(monkeypatch, *linked) == 0
    assert registry.get_model_version_by_alias(model_name, "baseline").version == base
    challenger = registry.get_model_version(model_name, version)
    assert challenger.tags["refine_af.eval.baseline_version"] == base
    baseline_tags = registry.get_model_version(model_name, base).tags
    assert baseline_tags["refine_af.eval.run_id"] == challenger.tags["refine_af.eval.run_id"]


def test_bad_registry_input_exits_2_and_writes_nothing(
    registry: mlflow.MlflowClient,
    model_name: str,
    tiny_lora_adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert registry_cli(monkeypatch, "models", "list") == 2  # no such registered model yet
    assert f"no registered model '{model_name}'" in capsys.readouterr().err
    v1, v2 = (register_folder(registry, model_name, tiny_lora_adapter_dir) for _ in "12")
    assert registry_cli(monkeypatch, "promote") == 2  # nothing is challenger
    assert "no 'challenger' alias" in capsys.readouterr().err
    assert registry_cli(monkeypatch, "promote", "--version", v1) == 2  # never evaluated
    assert "has no evaluation" in capsys.readouterr().err
    elsewhere = evaluation((1, 1, 1, 1), tmp_path).model_copy(update={"mlflow_run_id": "0" * 32})
    before = state(registry, model_name)
    with pytest.raises(InputError, match="is not in the tracking store"):
        register.mark_challenger(registry, model_name, v1, elsewhere)
    assert state(registry, model_name) == before

    # The champion's evaluation cannot be read: stop before writing anything.
    register.mark_challenger(registry, model_name, v1, evaluation((1, 1, 1, 1), tmp_path))
    assert registry_cli(monkeypatch, "promote", "--force", "--reason", "first") == 0
    registry.set_model_version_tag(model_name, v1, register.EVAL_ARTIFACT_TAG, "missing.json")
    register.mark_challenger(registry, model_name, v2, evaluation((2, 2, 2, 2), tmp_path))
    before = state(registry, model_name)
    assert registry_cli(monkeypatch, "promote") == 2
    assert "cannot be read" in capsys.readouterr().err
    assert state(registry, model_name) == before


def test_unreachable_registry_names_its_uri(
    tiny_causal_lm_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    out = tmp_path / "out"
    evaluate = ["stage", "evaluate", "--model", str(tiny_causal_lm_dir), "--out", str(out)]
    for args in (["promote"], ["models", "list"], evaluate, [*evaluate, "--version", "1"]):
        # an environment failure (issue 13): exit 1, one line naming the URI
        assert registry_cli(monkeypatch, *args, "--workspace", str(tmp_path)) == 1
        assert f"http://127.0.0.1:{port} is unreachable" in capsys.readouterr().err
    assert not out.exists()
