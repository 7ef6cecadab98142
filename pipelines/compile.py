"""Compile the pipeline to ``pipelines/refine_af.yaml`` (committed; a test keeps it fresh)."""

import argparse
from pathlib import Path

from kfp import compiler

from pipelines.refine_af_pipeline import refine_af_pipeline

COMPILED = Path(__file__).with_name("refine_af.yaml")


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(refine_af_pipeline, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=COMPILED, help="where to write the YAML")
    print(compile_pipeline(parser.parse_args().out))


if __name__ == "__main__":
    main()
