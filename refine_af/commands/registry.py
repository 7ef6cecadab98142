"""``refine-af promote`` and ``refine-af models …``: the model registry.

Stage 6 moves the champion alias; ``models list`` shows every version with its lineage
and promotion; ``models serve`` serves one over HTTP.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from refine_af.commands import summary
from refine_af.commands.common import ConfigOption, SetOption, WorkspaceOption, err, load, out
from refine_af.errors import InputError

models_app = typer.Typer(help="Inspect and serve registered models.", no_args_is_help=True)


def promote(
    version: Annotated[
        str | None, typer.Option(help="version to promote (default: the challenger alias)")
    ] = None,
    force: Annotated[bool, typer.Option(help="promote even if the gate fails")] = False,
    reason: Annotated[
        str | None, typer.Option(help="why the gate is overridden (needed with --force)")
    ] = None,
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 6: move the champion alias to the challenger if it passes the gate.

    The gate (stage6) compares the challenger's SuperNI evaluation task by task with its
    run's no-RL baseline and with the champion's, and must pass against each. With neither
    (a run without baseline on a registry without champion) there is nothing to beat and
    the challenger is rejected; --force --reason is the explicit override. Exits 1 when
    rejected; the decision, comparisons and gate are recorded as version tags either way.
    """
    from refine_af import tracking
    from refine_af.stages import register

    run_config = load(config, overrides)
    client = tracking.connect(workspace)
    result = register.promote(
        client,
        run_config.stage6.model_name,
        version,
        run_config.stage6,
        run_config.stage5,
        force=force,
        reason=reason,
    )
    decision = [
        ("version", result.version),
        ("champion before", result.champion_before or "none"),
        ("decision", result.decision),
        *(("", line) for line in result.reasons),
    ]
    out.print(summary.table(f"stage 6 · promote · {result.model_name}", decision))
    if result.rejected:
        champion = result.champion_before
        err.print(
            f"[bold red]gate failed:[/] version {result.version} stays challenger; "
            + (f"champion is still version {champion}" if champion else "there is no champion")
            + f"\n{result.summary}",
            highlight=False,
        )
        raise typer.Exit(1)


def list_versions(
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Registered versions of stage6.model_name: aliases, lineage, evaluation, promotion.

    The run's no-RL baselines are versions too (policy base, alias baseline on the latest).
    """
    from refine_af import registry, tracking
    from refine_af.stages import register

    run_config = load(config, overrides)
    name = run_config.stage6.model_name
    versions = registry.list_versions(tracking.connect(workspace), name)
    table = Table(title=f"registered model {name}")
    columns = ("version", "aliases", "policy", "created (UTC)", "ROUGE-L", "tasks")
    for column in (*columns, "vs baseline", "vs champion", "promotion"):
        table.add_column(column, justify="right" if column in {"ROUGE-L", "tasks"} else "left")
    table.add_column("lineage", no_wrap=True)
    for v in versions:
        tags = v.tags
        rouge = tags.get(f"{register.EVAL}rougeL")
        table.add_row(
            v.version,
            ", ".join(v.aliases),
            tags.get(register.POLICY_TAG, "-"),
            v.created.strftime("%Y-%m-%d %H:%M"),
            f"{float(rouge):.2f}" if rouge else "-",
            tags.get(f"{register.EVAL}tasks", "-"),
            *(_versus(tags, opponent) for opponent in (register.BASELINE, register.CHAMPION)),
            tags.get(f"{register.PROMOTION}decision", "-"),
            _lineage(tags),
        )
    out.print(table)


def _versus(tags: dict[str, str], opponent: str) -> str:
    """'62.5% improved (v3)' from the promotion tags of one comparison."""
    prefix = f"refine_af.promotion.{opponent}."
    improved = tags.get(f"{prefix}pct_tasks_improved")
    if improved is None:
        return "-"
    return f"{float(improved):.1f}% improved (v{tags.get(f'{prefix}version', '?')})"


def _lineage(tags: dict[str, str]) -> str:
    """Where a version came from: config hash, parent run, dataset digest, base model."""
    fields = (
        ("config", "refine_af.config_hash", 12),
        ("parent run", "refine_af.parent_run_id", 12),
        ("data", "refine_af.dataset_sha256", 12),
        ("base", "refine_af.base_model", None),
    )
    shown = [f"{label} {tags[key][:width]}" for label, key, width in fields if tags.get(key)]
    return ", ".join(shown) or "-"


def serve(
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
    alias: Annotated[str, typer.Option(help="registry alias to serve")] = "champion",
    version: Annotated[
        str | None, typer.Option(help="serve this version instead of the alias")
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 5001,
) -> None:
    """Serve a registered version over HTTP with `mlflow models serve --env-manager local`.

    The model answers POST /invocations in the format its flavor documents: OpenAI-style
    {"messages": [...]} for a chat model (optional max_tokens, temperature, top_p, top_k,
    stop; "top_k": 1 for the greedy answer, as temperature 0 is refused when the model
    samples), {"prompt": "..."} otherwise (optional max_tokens, temperature, stop). Runs
    until interrupted.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from refine_af import serving, tracking

    run_config = load(config, overrides)
    name = run_config.stage6.model_name
    client = tracking.connect(workspace)
    try:
        found = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, alias)
        )
    except MlflowException as error:
        wanted = f"version {version}" if version else f"alias @{alias}"
        raise InputError(f"registered model {name!r} has no {wanted} ({error.message})") from None
    model_uri = f"models:/{name}/{found.version}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(workspace)  # for the server too
    task = get_model_info(model_uri).flavors.get("transformers", {}).get("inference_task")
    example = serving.request(task, "Give me three tips for staying focused.", max_tokens=64)
    served = f"@{alias}" if version is None else "by version"
    out.print(f"serving {model_uri} ({served}) on http://{host}:{port}; try:")
    out.print(
        f"curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' "
        f"-d '{json.dumps(example)}'",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    if task in serving.REQUEST_FIELDS:  # not for a version logged before llm/v1 tasks
        out.print(f"a request may also set: {', '.join(serving.REQUEST_FIELDS[task])}")
    command = serving.serve_command(model_uri, host, port)
    # mlflow starts `uvicorn` by name: this environment's, even when it is not activated
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    os.execv(command[0], command)


models_app.command("list")(list_versions)
models_app.command("serve")(serve)
