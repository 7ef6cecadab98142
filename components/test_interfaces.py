"""Every component's interface, as the pipeline and the cluster see it, is the one its
README documents: the table's inputs and outputs with their types, and the image."""

import re
from pathlib import Path

import pytest

from components.evaluate.component import evaluate
from components.instances.component import instances
from components.instructions.component import instructions
from components.interface import interface
from components.merge.component import merge
from components.plan.component import plan
from components.promote.component import promote
from components.rlaf.component import rlaf
from components.sft.component import sft
from components.shards.component import shard_indices

HERE = Path(__file__).parent
ROW = re.compile(r"^\| (in|out) \| `(\w+)` \| ([\w.@]+)", re.MULTILINE)
IMAGE = re.compile(r"^Image: `([\w-]+)`", re.MULTILINE)
COMPONENTS = {
    "plan": plan,
    "shards": shard_indices,
    "instructions": instructions,
    "rlaf": rlaf,
    "instances": instances,
    "merge": merge,
    "sft": sft,
    "evaluate": evaluate,
    "promote": promote,
}


def test_every_component_folder_is_checked():
    folders = {p.parent.name for p in HERE.glob("*/component.py")}
    assert folders == set(COMPONENTS)


@pytest.mark.parametrize("folder", sorted(COMPONENTS))
def test_interface_is_the_documented_one(folder):
    readme = (HERE / folder / "README.md").read_text()
    documented = {"in": {}, "out": {}}
    for direction, name, kind in ROW.findall(readme):
        documented[direction][name] = kind
    inputs, outputs, image = interface(COMPONENTS[folder])
    assert inputs == documented["in"]
    assert outputs == documented["out"]
    (runtime,) = IMAGE.findall(readme)
    assert image.endswith(f"/{runtime}:0.1.0")
