"""Where each pipeline step runs: image, resources and GPU scheduling, chosen per compile.

Two profiles. ``gpu`` is the paper's setting: model steps on runtime-gpu with
accelerators, the GPU node selector and toleration. ``cpu`` fits the documented kind
cluster (4 CPU, 8 GB): every step on runtime-cpu, no accelerator, no selector or
toleration, small requests. ``refine-af submit --profile`` compiles with one of them to a
temporary file; the committed ``pipelines/refine_af.yaml`` is the gpu profile with the
default registry.

The pipeline module reads the profile that ``using`` activates while KFP builds the DAG
(``pipelines.refine_af_pipeline.pipeline_for``), so the DAG is written once for every
profile.

``served_generation`` (``refine-af submit --generation-endpoint``) places the steps that
only send prompts to a serving engine (stage 1 and the base-policy stage 3 shards) as
small CPU pods on runtime-cpu. Steps that generate with a LoRA adapter (the RL-policy
shards, stage 5) stay model steps: a server that cannot read the adapter leaves them to
generate in-process.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

DEFAULT_REGISTRY = "ghcr.io/refine-af"
DEFAULT_TAG = "0.1.0"
PROFILES = ("cpu", "gpu")


@dataclass(frozen=True)
class Size:
    """CPU and memory of one step: requested and the limit."""

    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str


@dataclass(frozen=True)
class Gpu:
    """How GPU steps find GPU nodes. The defaults are the NVIDIA GPU Operator's: GPU
    Feature Discovery labels nodes ``nvidia.com/gpu.present=true``, the device plugin
    exposes ``nvidia.com/gpu``, GPU pools are often tainted ``nvidia.com/gpu:NoSchedule``.
    """

    resource: str = "nvidia.com/gpu"
    node_label: str = "nvidia.com/gpu.present=true"
    toleration: str = "nvidia.com/gpu:NoSchedule"

    def node_selector(self) -> tuple[str, str]:
        key, sep, value = self.node_label.partition("=")
        if not sep or not key:
            raise ValueError(f"GPU node label must be key=value, got {self.node_label!r}")
        return key, value

    def toleration_parts(self) -> tuple[str, str]:
        """(key, effect) of an ``Exists`` toleration; ``key:Effect``."""
        key, sep, effect = self.toleration.partition(":")
        if not sep or not key or effect not in {"NoSchedule", "PreferNoSchedule", "NoExecute"}:
            raise ValueError(
                f"GPU toleration must be key:NoSchedule|PreferNoSchedule|NoExecute, "
                f"got {self.toleration!r}"
            )
        return key, effect


# Step sizes by kind of work. "model": loads and runs the LLM (stages 1-5).
GPU_SIZES = {
    "tiny": Size("100m", "256Mi", "100m", "256Mi"),
    "light": Size("1", "2Gi", "1", "2Gi"),
    "merge": Size("2", "4Gi", "2", "4Gi"),
    "generate": Size("8", "32Gi", "8", "32Gi"),
    "shard": Size("8", "48Gi", "8", "48Gi"),
    "train": Size("8", "64Gi", "8", "64Gi"),
    "client": Size("1", "2Gi", "2", "4Gi"),
}
# Fits kind on a 4-CPU/8-GB Docker VM next to KFP (requests about 0.6 CPU, 2.6 GiB)
# and MinIO, PostgreSQL, MLflow (0.55 CPU, 1.25 GiB): small requests so that the widest
# layer of the DAG (stage 2 beside two baseline shards, or four shards) schedules, limits
# that hold the bundled 135M model.
CPU_SIZES = {
    "tiny": Size("50m", "128Mi", "500m", "512Mi"),
    "light": Size("100m", "256Mi", "1", "1Gi"),
    "merge": Size("100m", "256Mi", "1", "1Gi"),
    "generate": Size("250m", "512Mi", "2", "3Gi"),
    "shard": Size("250m", "512Mi", "2", "3Gi"),
    "train": Size("250m", "768Mi", "2", "4Gi"),
    "client": Size("250m", "512Mi", "2", "3Gi"),
}


@dataclass(frozen=True)
class Placement:
    """One profile with the registry and tag the images are pulled from."""

    profile: str = "gpu"
    registry: str = DEFAULT_REGISTRY
    tag: str = DEFAULT_TAG
    gpu: Gpu = field(default_factory=Gpu)
    # A PersistentVolumeClaim (in the pipeline's namespace) that model steps share as their
    # Hugging Face and refine-af model cache, so a base model is downloaded once per
    # cluster, not per pod; "" = each pod downloads into its own disk.
    model_cache: str = ""
    # Generation goes to a serving engine: base-model generating steps need no GPU.
    served_generation: bool = False

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        self.gpu.node_selector()
        self.gpu.toleration_parts()

    @property
    def uses_gpus(self) -> bool:
        return self.profile == "gpu"

    def image(self, gpu_step: bool) -> str:
        name = "runtime-gpu" if gpu_step and self.uses_gpus else "runtime-cpu"
        return f"{self.registry}/{name}:{self.tag}"

    def size(self, kind: str) -> Size:
        return (GPU_SIZES if self.uses_gpus else CPU_SIZES)[kind]


def from_environment(**changes: object) -> Placement:
    """The gpu profile with ``REFINE_AF_IMAGE_REGISTRY`` / ``_TAG`` applied, then
    ``changes``."""
    placement = Placement(
        registry=os.environ.get("REFINE_AF_IMAGE_REGISTRY", DEFAULT_REGISTRY),
        tag=os.environ.get("REFINE_AF_IMAGE_TAG", DEFAULT_TAG),
    )
    return replace(placement, **changes)  # type: ignore[arg-type]


_ACTIVE: contextvars.ContextVar[Placement] = contextvars.ContextVar("placement")


def active() -> Placement:
    """The placement of the DAG being built (the environment's gpu profile outside ``using``)."""
    return _ACTIVE.get(None) or from_environment()


@contextlib.contextmanager
def using(placement: Placement) -> Iterator[Placement]:
    token = _ACTIVE.set(placement)
    try:
        yield placement
    finally:
        _ACTIVE.reset(token)
