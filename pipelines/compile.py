"""Compile the pipeline for a placement profile.

With no options it writes ``pipelines/refine_af.yaml`` (committed; a test keeps it fresh):
the gpu profile, images from ``REFINE_AF_IMAGE_REGISTRY``/``_TAG`` or their defaults.
``refine-af submit`` runs it with ``--profile``, ``--registry`` and ``--tag`` into a
temporary file, so the committed YAML is never rewritten. ``--images`` prints the images
a compiled pipeline names, one per line (what ``scripts/kind-load.sh`` loads).
"""

import argparse
import re
from dataclasses import replace
from pathlib import Path

from kfp import compiler

from pipelines import placement
from pipelines.refine_af_pipeline import pipeline_for

COMPILED = Path(__file__).with_name("refine_af.yaml")


def compile_pipeline(path: Path = COMPILED, where: placement.Placement | None = None) -> Path:
    pipeline = pipeline_for(where or placement.from_environment())
    compiler.Compiler().compile(pipeline, str(path))
    return path


def images(path: Path) -> list[str]:
    """The container images a compiled pipeline names, sorted."""
    return sorted(set(re.findall(r"^\s*image: (\S+)$", path.read_text(), flags=re.MULTILINE)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=COMPILED, help="where to write the YAML")
    parser.add_argument("--profile", choices=placement.PROFILES, default="gpu",
                        help="cpu: runtime-cpu, no GPUs (kind); gpu: GPU nodes")  # fmt: skip
    parser.add_argument("--registry", help="image registry (default $REFINE_AF_IMAGE_REGISTRY)")
    parser.add_argument("--tag", help="image tag (default $REFINE_AF_IMAGE_TAG)")
    parser.add_argument("--gpu-node-label", help="key=value label of GPU nodes")
    parser.add_argument("--gpu-resource", help="extended resource of a GPU")
    parser.add_argument("--gpu-toleration", help="key:Effect of the GPU nodes' taint")
    parser.add_argument("--model-cache", default="",
                        help="PVC that model steps share as their model cache")  # fmt: skip
    parser.add_argument("--served-generation", action="store_true",
                        help="stage 1 and the base-policy shards as CPU pods that send their "
                        "prompts to generation_endpoint (give it at submit)")  # fmt: skip
    parser.add_argument("--images", type=Path, metavar="YAML",
                        help="print the images YAML names and exit")  # fmt: skip
    args = parser.parse_args()
    if args.images:
        print("\n".join(images(args.images)))
        return
    where = placement.from_environment(profile=args.profile)
    gpu = {
        name: value
        for name, value in (
            ("node_label", args.gpu_node_label),
            ("resource", args.gpu_resource),
            ("toleration", args.gpu_toleration),
        )
        if value
    }
    try:
        where = replace(
            where,
            registry=args.registry or where.registry,
            tag=args.tag or where.tag,
            gpu=replace(where.gpu, **gpu),
            model_cache=args.model_cache,
            served_generation=args.served_generation,
        )
    except ValueError as error:  # a malformed --gpu-node-label or --gpu-toleration
        parser.error(str(error))
    print(compile_pipeline(args.out, where))


if __name__ == "__main__":
    main()
