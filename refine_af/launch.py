"""Run a training stage under ``accelerate launch``: one process per GPU on one node.

DeepSpeed and multi-GPU data parallelism need the launcher's ``RANK``, ``WORLD_SIZE`` and
``MASTER_ADDR``; a pipeline step that calls the stage in its own process has none. The
pipeline's training steps therefore spawn ``accelerate launch --num_processes N -m
refine_af.cli stage <name> …`` and read the stage's ``summary.json`` afterwards. Only
N ≥ 2 goes through torch's distributed launcher; with N = 1 accelerate sets none of
those variables, so a DeepSpeed stage sets the single-process rendezvous itself
(``single_process_rendezvous``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def command(
    processes: int, stage: str, stage_args: list[str], *, python: str = sys.executable
) -> list[str]:
    """The ``accelerate launch`` command line for ``refine-af stage <stage> <stage_args>``."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    launch = [python, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    launch += ["--num_processes", str(processes)]
    if processes > 1:
        launch.append("--multi_gpu")
    return [*launch, "-m", "refine_af.cli", "stage", stage, *stage_args]


RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def single_process_rendezvous(environ=os.environ) -> bool:
    """Give a process started without a distributed launcher a world of one.

    DeepSpeed initialises torch.distributed from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; with
    one GPU (``accelerate launch --num_processes 1``, the CLI, a notebook) nothing sets them
    and it fails. This sets them as ``deepspeed --num_gpus 1`` would, on a free local port.
    A launcher's own values are left alone. Returns whether anything was set.
    """
    if any(name in environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    environ.update({**values, "MASTER_PORT": environ.get("MASTER_PORT", str(port))})
    return True


def stage_args(
    config: str, config_hash: str, workspace: Path, parent_run_id: str = ""
) -> list[str]:
    """The options a pipeline step hands the stage: its resolved configuration and hash,
    its workspace and the MLflow parent run ("": found by the pipeline run's tag)."""
    args = ["--config", config, "--config-hash", config_hash, "--workspace", str(workspace)]
    return [*args, "--parent-run-id", parent_run_id] if parent_run_id else args


def run_stage(processes: int, stage: str, stage_args: list[str], out_dir: Path) -> dict:
    """Launch the stage, stop with its exit status if it fails, return its summary."""
    completed = subprocess.run(command(processes, stage, stage_args), check=False)
    if completed.returncode != 0:
        sys.exit(f"accelerate launch of stage {stage} failed (exit {completed.returncode})")
    return json.loads((out_dir / "summary.json").read_text())
