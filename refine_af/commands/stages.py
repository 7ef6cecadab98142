"""``refine-af stage …``: run one stage of the method on local paths.

Each command parses its options, calls the stage (which checks its own inputs before any
model loads) under the output folder's lock with a progress bar, and shows the stage's
summary as one table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refine_af.commands import evaluate, summary
from refine_af.commands.common import (
    ConfigHashOption,
    ConfigOption,
    ParentRunOption,
    SetOption,
    WorkspaceOption,
    err,
    load,
    locked,
    out,
    progress,
)

app = typer.Typer(
    help="Run one stage of the method on local paths.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

OutOption = Annotated[Path, typer.Option("--out", "-o", help="output folder")]
InstructionsOption = Annotated[
    str, typer.Option("--instructions", "-i", help="stage 1's instructions.jsonl (or s3://)")
]


@app.command("instructions")
def instructions(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (resumable)")],
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    seed_tasks: Annotated[
        str | None, typer.Option(help="seed task JSONL, path or s3:// (default: the bundled 175)")
    ] = None,
    force_resume: Annotated[
        bool,
        typer.Option(help="continue a run in --out even if its pool came from other settings"),
    ] = False,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 1: bootstrap new instructions from the seed tasks (Self-Instruct).

    Writes instructions.jsonl (seeds + accepted machine instructions), filtered.jsonl
    (rejected candidates with their reason), quarantine.jsonl (unparseable or truncated
    output) and summary.json. Re-running with the same --out continues the run.
    """
    from refine_af.stages import instructions as stage

    extra = [f"stage1.seed_tasks={seed_tasks}"] if seed_tasks else []
    run_config = load(config, [*(overrides or []), *extra])
    target = run_config.stage1.num_instructions
    with (
        locked(out_dir),
        progress("instructions", "round {task.fields[round]} · {task.fields[rate]} kept") as bar,
    ):
        task = bar.add_task("bootstrap", total=target, round=0, rate="-")

        def show(state: stage.Bootstrap) -> None:
            counts = state.counts()
            rate = f"{counts['accepted'] / max(counts['candidates'], 1):.0%}"
            bar.update(task, completed=counts["accepted"], round=state.rounds, rate=rate)

        result = stage.execute(
            run_config, out_dir, workspace=workspace, on_round=show, force_resume=force_resume
        )
    keys = ["candidates", "accepted", "filtered", "quarantined", "classification", "rounds"]
    _show(f"stage 1 · instructions · {result.summary['seconds']} s", result.summary, keys)
    if not result.summary["reached_target"]:
        err.print(
            f"[yellow]stopped after stage1.max_rounds={run_config.stage1.max_rounds} rounds "
            f"with {result.summary['accepted']}/{target} instructions[/]"
        )


@app.command("rlaf")
def rlaf(
    instructions: InstructionsOption,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (resumable)")],
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    config_hash: ConfigHashOption = None,
    workspace: WorkspaceOption = Path("workspace"),
    parent_run_id: ParentRunOption = None,
) -> None:
    """Stage 2: train the instance writer by RL from automated feedback (LoRA, trl).

    Writes adapter/ (LoRA weights + tokenizer), rlaf_config.yaml, reward.json,
    metrics.jsonl, reward_curves.png, samples.jsonl and summary.json; trainer checkpoints
    in checkpoints/ let a re-run with the same --out continue. On GPUs, launch it with
    `accelerate launch --num_processes N -m refine_af.cli stage rlaf` and the same options.
    """
    from accelerate import PartialState

    from refine_af.stages import rlaf as stage

    run_config = load(config, overrides, config_hash)
    with (
        locked(out_dir),
        progress(
            "rlaf", "reward {task.fields[reward]}", disable=not PartialState().is_main_process
        ) as bar,
    ):
        task = bar.add_task("rlaf", total=run_config.stage2.max_steps, reward="-")

        def show(step: int, total: int, metrics: dict[str, float]) -> None:
            reward = metrics.get("reward")
            shown = {} if reward is None else {"reward": f"{reward:.3f}"}
            bar.update(task, completed=step, total=total, **shown)

        result = stage.run(
            run_config,
            instructions,
            out_dir,
            workspace=workspace,
            parent_run_id=parent_run_id,
            on_step=show,
        )
    if result.summary:  # the main process
        s = result.summary
        keys = ["instructions", "steps", "reward_first5", "reward_last5", "completions_scored"]
        more = ["floored", "adapter"]
        _show(f"stage 2 · rlaf ({s['trainer']}) · {s['seconds']} s", s, [*keys, *more])


@app.command("instances")
def instances(
    instructions: InstructionsOption,
    out_dir: OutOption,
    adapter: Annotated[
        str | None,
        typer.Option(help="stage 2's adapter folder (stage3.adapter); without it: the baseline"),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="write only shard i of n (0-based, e.g. 0/4); join with `stage merge`"),
    ] = None,
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    force_resume: Annotated[
        bool,
        typer.Option(help="continue a run in --out even if its blocks came from other settings"),
    ] = False,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 3: instances for the instructions, written by the policy and scored.

    Writes examples.jsonl (the triplets with scores and reward), filtered.jsonl and
    quarantine.jsonl (with reasons), alpaca.json, dataset/ (parquet + dataset card) and
    summary.json. With --shard, writes that shard's records and shard.json instead.
    Re-running with the same --out continues from the last finished block.
    """
    from refine_af.stages import instances as stage

    extra = [f"stage3.adapter={adapter}"] if adapter else []
    run_config = load(config, [*(overrides or []), *extra])
    part = stage.Shard.parse(shard) if shard else None
    with locked(out_dir), progress("instances", "instructions · {task.fields[kept]} kept") as bar:
        task = bar.add_task("instances", total=None, kept=0)

        def show(done: int, total: int, so_far: stage.Part) -> None:
            bar.update(task, completed=done, total=total, kept=len(so_far.examples))

        result = stage.execute(
            run_config, instructions, out_dir, workspace=workspace, shard=part, on_block=show,
            force_resume=force_resume,
        )  # fmt: skip
    where = f" · shard {part.index}/{part.count}" if part else ""
    _show_instances(result.summary, where)
    if part is None and not result.summary["kept"]:
        err.print("[yellow]no example was kept; stage 4 needs some (see filtered.jsonl)[/]")


@app.command("merge")
def merge(
    shards: Annotated[
        list[Path], typer.Argument(help="shard folders of one `stage instances` run")
    ],
    out_dir: OutOption,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 3: join the shards of `stage instances --shard i/n` into the dataset.

    The result is the same, byte for byte, as one unsharded run; the configuration is the
    one the shards recorded.
    """
    from refine_af.stages import instances as stage

    with locked(out_dir):
        result = stage.merge(shards, out_dir, workspace=workspace)
    _show_instances(result.summary, "")


def _show_instances(s: dict, where: str) -> None:
    keys = [
        "instructions", ("generations", "completions sampled"), "kept", "filtered",
        "quarantined", "instructions_with_examples", ("mean_reward", "mean reward of kept"),
    ]  # fmt: skip
    _show(f"stage 3 · instances ({s['policy']} policy){where} · {s['seconds']} s", s, keys)


@app.command("sft")
def sft(
    examples: Annotated[
        str, typer.Option("--examples", "-e", help="stage 3's examples.jsonl (or s3://)")
    ],
    out_dir: OutOption,
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    config_hash: ConfigHashOption = None,
    workspace: WorkspaceOption = Path("workspace"),
    parent_run_id: ParentRunOption = None,
) -> None:
    """Stage 4: fine-tune a LoRA adapter on the examples (trl SFT) and register it.

    Writes adapter/ (LoRA weights, tokenizer, model card), sft_config.yaml, metrics.jsonl
    and summary.json; the adapter becomes a new version of stage6.model_name in the MLflow
    registry unless stage4.register_model=false. On several GPUs:
    `accelerate launch --num_processes N -m refine_af.cli stage sft ...`.
    """
    from accelerate import PartialState

    from refine_af.stages import sft as stage

    run_config = load(config, overrides, config_hash)
    main = PartialState().is_main_process
    with locked(out_dir), progress("sft", "loss {task.fields[loss]}", disable=not main) as bar:
        task = bar.add_task("sft", total=None, loss="-")

        def show(step: int, total: int, metrics: dict[str, float]) -> None:
            loss = metrics.get("loss")
            shown = {} if loss is None else {"loss": f"{loss:.3f}"}
            bar.update(task, completed=step, total=total, **shown)

        result = stage.run(
            run_config,
            examples,
            out_dir,
            workspace=workspace,
            parent_run_id=parent_run_id,
            on_step=show,
        )
    if result.summary:  # the main process
        s = result.summary
        keys = [
            "train_examples", "eval_examples", "eval_instructions", "template", "steps",
            "epochs", "train_loss", "eval_loss_before", "eval_loss", "adapter",
            "registered_model", "registered_version",
        ]  # fmt: skip
        _show(f"stage 4 · sft ({s['policy']} policy data) · {s['seconds']} s", s, keys)


def _show(title: str, stage_summary: dict, keys: list) -> None:
    """The stage's summary table, ending with the hash of the configuration it ran."""
    out.print(summary.table(title, summary.rows(stage_summary, [*keys, "config_hash"])))


app.command("evaluate")(evaluate.evaluate)
