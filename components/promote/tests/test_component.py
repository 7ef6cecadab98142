"""The promote component's interface, as the pipeline and the cluster see it."""

from components.interface import interface
from components.promote.component import promote


def test_interface():
    inputs, outputs, image = interface(promote)
    assert inputs == {
        "config": "String",
        "overrides": "List",
        "base_model": "String",
        "parent_run_id": "String",
        "version": "String",
        "instructions_kept": "Integer",
        "rl_mean_reward": "Float",
        "pct_tasks_improved": "Float",
        "base_mean_reward": "Float",
    }
    assert outputs == {"summary": "system.Markdown@0.0.1", "Output": "String"}
    assert image.endswith("/runtime-cpu:0.1.0")
