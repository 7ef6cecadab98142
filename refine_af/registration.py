"""Stage 4's adapter in the MLflow registry: logged with ``mlflow.transformers``, registered.

A re-run of a finished stage finds the version its config and dataset already registered
(``IDENTITY_TAGS``) instead of adding a duplicate.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from refine_af import models, serving, tracking
from refine_af.config import RunConfig
from refine_af.templates import Template

MODEL_ARTIFACT = "model"
TAG = "refine_af."
IDENTITY_TAGS = (f"{TAG}config_hash", f"{TAG}dataset_sha256")
# what the logged model needs to load; pinned to the versions that trained it
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors")


def _pip_requirements() -> list[str]:
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def registered_version(client, name: str, tags: dict[str, str]) -> str | None:
    """The version of ``name`` already registered from this config and dataset, if any:
    re-running a finished stage must not add a duplicate version."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if all(version.tags.get(key) == tags[key] for key in IDENTITY_TAGS):
            return str(version.version)
    return None


def register(
    config: RunConfig,
    trainer,
    card: str,
    tags: dict[str, str],
    workspace: Path,
    template: Template,
) -> str:
    """Log the adapter with ``mlflow.transformers`` and register it; returns the version.

    A local base (the bundled model, an s3 mirror) is referenced by its path, a hub base by
    its repository and revision: either way only the adapter is stored. It is logged to be
    asked in ``template``, the format it was trained on (``serving.flavor_arguments``).
    """
    import mlflow
    from huggingface_hub import ModelCard

    name = config.stage6.model_name
    client = tracking.connect(workspace)
    if (existing := registered_version(client, name, tags)) is not None:
        return existing
    base_location = models.resolve(config.model.base)
    info = mlflow.transformers.log_model(
        transformers_model={
            "model": trainer.accelerator.unwrap_model(trainer.model),
            "tokenizer": trainer.processing_class,
        },
        name=MODEL_ARTIFACT,
        registered_model_name=name,
        base_model_path=base_location if Path(base_location).is_dir() else None,
        model_card=ModelCard(card),
        pip_requirements=_pip_requirements(),
        **serving.flavor_arguments(
            template,
            config.stage5.max_new_tokens,
            config.generation.temperature,
            config.generation.top_p,
        ),
    )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version
