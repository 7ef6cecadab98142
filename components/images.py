"""The container images: one place for their names, pinned tags, overridable.

``REFINE_AF_IMAGE_REGISTRY`` and ``REFINE_AF_IMAGE_TAG`` (read when the pipeline is
compiled) point the components at a private registry; the defaults match
``scripts/build-images.sh`` (which tags exactly these) and ``images/README.md``.
"""

import os

REGISTRY = os.environ.get("REFINE_AF_IMAGE_REGISTRY", "ghcr.io/refine-af")
TAG = os.environ.get("REFINE_AF_IMAGE_TAG", "0.1.0")

RUNTIME_CPU = f"{REGISTRY}/runtime-cpu:{TAG}"
RUNTIME_GPU = f"{REGISTRY}/runtime-gpu:{TAG}"
MLFLOW = f"{REGISTRY}/mlflow:{TAG}"
# Local runs only (`make run-containers`): moto's S3 server, standing in for MinIO.
S3_STANDIN = f"{REGISTRY}/s3-standin:{TAG}"
