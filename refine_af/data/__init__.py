"""Data that ships with the package: the Self-Instruct seed tasks and the SuperNI English test
set (both Apache-2.0, see licenses/ and the README beside each file)."""

from importlib import resources
from pathlib import Path


def bundled(name: str) -> Path:
    """Path of a bundled data file."""
    return Path(str(resources.files(__name__).joinpath(name)))


def seed_tasks_path() -> Path:
    return bundled("seed_tasks.jsonl")


def superni_test_path() -> Path:
    return bundled("superni_test.jsonl.gz")
