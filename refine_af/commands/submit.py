"""``refine-af submit``: send the pipeline to Kubeflow Pipelines.

The work is ``pipelines.submit``, beside the pipeline: it needs KFP, which the library
never imports. Without the pipeline extra the command stops (exit 2) with the install
command; it runs from the repository root, where ``pipelines/`` is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from refine_af.commands.common import ConfigOption, SetOption, err, load, out
from refine_af.errors import InputError

INSTALL = "pip install -e '.[pipeline]'"


def pipelines_submit() -> ModuleType:
    """``pipelines.submit`` from the checkout in the working directory; InputError (exit 2)
    naming what to install or where to run when it cannot be imported."""
    if importlib.util.find_spec("kfp") is None:
        raise InputError(f"refine-af submit needs the pipeline extra (KFP): {INSTALL}")
    if not Path("pipelines", "submit.py").is_file():
        raise InputError(
            f"pipelines/submit.py not found in {Path.cwd()}: run `refine-af submit` from the "
            "repository root"
        )
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the console script's path lacks the checkout
    return importlib.import_module("pipelines.submit")


def submit(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. http://localhost:30880")],
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = "refine-af",
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    shards: Annotated[int, typer.Option(help="instance-generation shards")] = 2,
    baseline: Annotated[bool, typer.Option(help="also build the no-RL baseline")] = True,
    profile: Annotated[
        str,
        typer.Option(help="placement: cpu (runtime-cpu, no GPUs: kind) or gpu (GPU nodes)"),
    ] = "gpu",
    registry: Annotated[
        str | None,
        typer.Option(help="image registry", envvar="REFINE_AF_IMAGE_REGISTRY", show_default=False),
    ] = None,
    tag: Annotated[
        str | None, typer.Option(help="image tag", envvar="REFINE_AF_IMAGE_TAG", show_default=False)
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per training step (gpu profile)")] = 1,
    gpu_node_label: Annotated[
        str | None, typer.Option(help="key=value label of GPU nodes [nvidia.com/gpu.present=true]")
    ] = None,
    gpu_resource: Annotated[
        str | None, typer.Option(help="extended resource of a GPU [nvidia.com/gpu]")
    ] = None,
    gpu_toleration: Annotated[
        str | None, typer.Option(help="key:Effect taint of GPU nodes [nvidia.com/gpu:NoSchedule]")
    ] = None,
    model_cache: Annotated[
        str | None,
        typer.Option(help="PVC (namespace kubeflow) that model steps share as model cache"),
    ] = None,
    package: Annotated[
        Path | None,
        typer.Option(help="upload this compiled pipeline as it is instead of compiling one"),
    ] = None,
    service_account: Annotated[str | None, typer.Option(help="pods' ServiceAccount")] = None,
    wait: Annotated[bool, typer.Option(help="wait for the run to finish")] = False,
    timeout: Annotated[int, typer.Option(help="seconds to wait with --wait")] = 7200,
    api_timeout: Annotated[
        float,
        typer.Option(min=1, help="seconds the KFP API may take to accept the run (or to report)"),
    ] = 60.0,
    generation_endpoint: Annotated[
        str,
        typer.Option(
            help="OpenAI-compatible server (vLLM) for stages 1, 3, 5; stage 1 and the "
            "base-policy shards then run as small CPU pods; default in-process"
        ),
    ] = "",
) -> None:
    """Compile the pipeline for the cluster and submit it to Kubeflow Pipelines.

    The configuration is checked here and sent as YAML text (the `config` parameter), so a
    bad preset or override stops (exit 2) before anything reaches the cluster. The pipeline
    is compiled to a temporary file with the profile, registry and tag asked for; the
    committed pipelines/refine_af.yaml is not touched. A run that fails or outlasts
    --timeout ends with exit 1, its URL and the step that failed or was still pending.
    Needs the pipeline extra and the repository checkout (run it from its root).
    """
    submission = pipelines_submit()
    submission.check_options(shards, gpus, profile, package)
    run_config = load(config, overrides)
    arguments = {
        "shards": shards,
        "run_baseline": baseline,
        "gpus": gpus,
        "generation_endpoint": generation_endpoint,
    }
    compile_options = {
        "registry": registry,
        "tag": tag,
        "gpu-node-label": gpu_node_label,
        "gpu-resource": gpu_resource,
        "gpu-toleration": gpu_toleration,
        "model-cache": model_cache,
        # with a serving engine, steps that only send it prompts need no GPU
        "served-generation": bool(generation_endpoint),
    }
    try:
        submission.submit(
            host, experiment, run_config, arguments,
            profile=profile, compile_options=compile_options, package=package,
            service_account=service_account, timeout=timeout if wait else None,
            api_timeout=api_timeout, say=out.print,
            note=lambda line: err.print(line, highlight=False),
        )  # fmt: skip
    except submission.SubmitFailed as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
