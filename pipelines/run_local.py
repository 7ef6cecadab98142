"""Run the pipeline on this machine with KFP's local runner (``make run``).

The same DAG as on the cluster, executed by ``kfp.local``'s SubprocessRunner in this
Python environment: artifacts in ``<workspace>/kfp``, MLflow in ``<workspace>/mlflow.db``
unless ``MLFLOW_TRACKING_URI`` is set. Ends with a summary of the run and each step's
wall time.

``--runner docker`` (``make run-containers``) runs every component in the runtime-cpu
image under ``kfp.local.DockerRunner``, with MLflow and an S3 stand-in in containers
(pipelines/containers.py); finished steps are cached, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import uuid
from pathlib import Path

from refine_af import threads, tracking
from refine_af.config import load_config
from refine_af.errors import InputError

# kfp.local runs at most this many ParallelFor iterations at once (its "conservative" cap)
LOCAL_PARALLELISM = 2
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class StepClock(logging.Filter):
    """Each step's wall time, read off kfp.local's "Executing task" / "finished" log lines.

    A filter on the root logger, because kfp.local swaps the root handlers per task.
    """

    START = re.compile(r"Executing task '([^']+)'")
    END = re.compile(r"Task '([^']+)' finished with status (\w+)")

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, list[float]] = {}
        self.steps: list[tuple[str, float, str]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = _ANSI.sub("", record.getMessage())
        if started := self.START.search(text):
            self.started.setdefault(started[1], []).append(record.created)
        elif ended := self.END.search(text):
            begun = self.started.get(ended[1], [])
            if begun:
                self.steps.append((ended[1], record.created - begun.pop(0), ended[2]))
        return True

    def table(self, total: float) -> str:
        rows = [(name, seconds, status) for name, seconds, status in self.steps]
        width = max([len(name) for name, _, _ in rows] + [len("pipeline")])
        lines = ["step wall time (finish order; parallel shards overlap):"]
        lines += [f"  {name:<{width}}  {_clock(s)}  {st.lower()}" for name, s, st in rows]
        lines.append(f"  {'pipeline':<{width}}  {_clock(total)}")
        return "\n".join(lines)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def check_inputs(config: str, overrides: list[str], shards: int, endpoint: str = "") -> None:
    """Bad input stops here, before any component runs."""
    if shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    load_config(config, overrides, generation_endpoint=endpoint)


def run(
    config: str,
    overrides: list[str],
    shards: int,
    run_baseline: bool,
    workspace: Path,
    generation_endpoint: str = "",
):
    from kfp import local

    from pipelines.refine_af_pipeline import refine_af_pipeline

    workspace = workspace.resolve()
    os.environ["REFINE_AF_WORKSPACE"] = str(workspace)
    # On a cluster the pod's Argo workflow name; here one id per run, for the cached steps
    # that find the MLflow parent run by it (refine_af.tracking.PIPELINE_RUN_ENV).
    os.environ[tracking.PIPELINE_RUN_ENV] = new_pipeline_run()
    # the shards of one ParallelFor share this host's cores (threads.use_share_of_cores)
    os.environ[threads.PARALLEL_SHARDS_ENV] = str(min(shards, LOCAL_PARALLELISM))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workspace / "kfp"))
    refine_af_pipeline(
        config=config,
        overrides=overrides,
        shards=shards,
        run_baseline=run_baseline,
        generation_endpoint=generation_endpoint,
    )


def new_pipeline_run() -> str:
    """An id for one local run, standing in for the cluster's workflow name."""
    return f"local-{uuid.uuid4().hex}"


def run_in_containers(
    config: str, overrides: list[str], shards: int, run_baseline: bool, workspace: Path,
    mlflow_port: int,
) -> list[str]:  # fmt: skip
    """The same pipeline, every step in the runtime-cpu image; returns the S3 objects."""
    from kfp import local

    from pipelines import containers, placement
    from pipelines.refine_af_pipeline import pipeline_for

    # the cpu profile: every step, GPU steps included, in the runtime-cpu image
    refine_af_pipeline = pipeline_for(placement.from_environment(profile="cpu"))
    workspace = workspace.resolve()
    # Only the pipeline root is mounted into the step containers (at the same path), so
    # the stages' own working folder lives inside it; docker would create a missing
    # mount source as root, hence the folders are made (and handed to uid 1000) first.
    with containers.stack(workspace, mlflow_port) as stack:
        (workspace / "kfp" / ".refine-af").mkdir(parents=True, exist_ok=True)
        containers.own_workspace(workspace)
        local.init(
            runner=containers.docker_runner(
                stack, workspace / "kfp" / ".refine-af", new_pipeline_run()
            ),
            pipeline_root=str(workspace / "kfp"),
            enable_caching=True,
        )
        refine_af_pipeline(
            config=config, overrides=overrides, shards=shards, run_baseline=run_baseline
        )
        os.environ["MLFLOW_TRACKING_URI"] = stack.mlflow_url
        objects = containers.list_objects(stack.s3_url)
        model_name = load_config(config, overrides).stage6.model_name
        print(summary(workspace, model_name, ui_hint=False))  # the server is gone afterwards
        print(f"\nS3 objects written ({len(objects)}, s3://{containers.BUCKET}, mirrored to "
              f"{workspace / 's3' / containers.BUCKET}):")  # fmt: skip
        for prefix, count in sorted(_by_prefix(objects).items()):
            print(f"  {prefix:<60} {count}")
        store = workspace / "mlflow" / "mlflow.db"
        print(f"MLflow UI during the run: {stack.mlflow_url} (the server is removed now)")
        print(f"its store stays: .venv/bin/mlflow ui --backend-store-uri sqlite:///{store}")
    return objects


def _by_prefix(keys: list[str], depth: int = 4) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        prefix = "/".join(key.split("/")[:depth])
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def _shown(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary(workspace: Path, model_name: str, *, ui_hint: bool = True) -> str:
    """The run's headline figures from MLflow: the last pipeline run and the registry.

    ``ui_hint`` adds the command that opens the MLflow UI on the run's store.
    """
    client = tracking.connect(workspace)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`refine_af.stage` = 'pipeline'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    metrics = runs[0].data.metrics if runs else {}
    run_tags = runs[0].data.tags if runs else {}
    model = client.get_registered_model(model_name)
    versions = client.search_model_versions(f"name = '{model_name}'")
    if runs:  # this run's versions, by their lineage tag
        run_id = runs[0].info.run_id
        versions = [v for v in versions if v.tags.get("refine_af.parent_run_id") == run_id]

    def registered(policy: str) -> str | None:
        mine = [v for v in versions if v.tags.get("refine_af.policy") == policy]
        if not mine:
            return None
        latest = max(mine, key=lambda v: int(v.version)).version
        aliases = sorted(a for a, v in model.aliases.items() if str(v) == str(latest))
        return f"{model_name} v{latest} ({', '.join(aliases) or '-'})"

    rows = [
        ("instructions kept", metrics.get("instructions_kept")),
        ("mean reward, base policy", metrics.get("mean_reward_base_policy")),
        ("mean reward, RL policy", metrics.get("mean_reward_rl_policy")),
        ("SuperNI ROUGE-L, candidate", metrics.get("candidate_rougeL")),
        ("SuperNI ROUGE-L, baseline", metrics.get("baseline_rougeL")),
        ("% tasks improved over baseline", metrics.get("pct_tasks_improved_over_baseline")),
        ("% tasks improved over champion", metrics.get("pct_tasks_improved_over_champion")),
        ("registered model", registered("rl")),
        ("registered baseline", registered("base")),
        ("promotion", run_tags.get("refine_af.promotion")),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {_shown(value)}" for name, value in rows]
    if ui_hint:
        uri = tracking.tracking_uri(workspace)
        lines.append(f"\nopen the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="local-cpu", help="preset name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="section.key=value override (repeatable)")  # fmt: skip
    parser.add_argument("--shards", type=int, default=2, help="instance-generation shards")
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-RL baseline")
    parser.add_argument("--workspace", type=Path, default=Path("workspace"))
    parser.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                        help="docker: every step in the runtime-cpu image")  # fmt: skip
    parser.add_argument("--mlflow-port", type=int, default=5000,
                        help="with --runner docker: the MLflow UI's port (0: any)")  # fmt: skip
    parser.add_argument("--generation-endpoint", default="",
                        help="OpenAI-compatible server for stages 1, 3 and 5, e.g. "
                        "http://127.0.0.1:8000/v1 (default: in-process)")  # fmt: skip
    args = parser.parse_args()
    config = args.config
    if Path(config).is_file():
        config = Path(config).read_text()  # the pipeline parameter carries YAML text
    try:
        check_inputs(config, args.overrides, args.shards, args.generation_endpoint)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    clock = StepClock()
    logging.getLogger().addFilter(clock)
    started = time.monotonic()
    if args.runner == "docker":
        from pipelines.containers import StackError

        try:
            run_in_containers(config, args.overrides, args.shards, not args.no_baseline,
                              args.workspace, args.mlflow_port)  # fmt: skip
        except StackError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except RuntimeError as error:  # a step failed or its container was killed
            print(f"error: {error}\nrerun the same command to resume: finished steps are "
                  "cached under the workspace", file=sys.stderr)  # fmt: skip
            sys.exit(1)
        print(clock.table(time.monotonic() - started))
        return
    run(
        config,
        args.overrides,
        args.shards,
        not args.no_baseline,
        args.workspace,
        args.generation_endpoint,
    )
    total = time.monotonic() - started
    model_name = load_config(config, args.overrides).stage6.model_name
    print(summary(args.workspace, model_name))
    print(clock.table(total))


if __name__ == "__main__":
    main()
