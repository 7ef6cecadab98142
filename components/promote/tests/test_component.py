"""The promote component, called as KFP calls it: it runs only plan's configuration."""

import pytest
from kfp import dsl

from components.promote.component import promote
from refine_af.config import load_config


def test_a_config_that_does_not_match_its_hash_stops_with_exit_2(tmp_path, capsys):
    summary = dsl.Markdown(name="summary", uri=str(tmp_path / "summary.md"))
    with pytest.raises(SystemExit) as stopped:
        promote.python_func(
            config=load_config("local-cpu").to_yaml(), config_hash="0" * 12,
            parent_run_id="", version="1", instructions_kept=1, rl_mean_reward=0.5,
            pct_tasks_improved=-1.0, summary=summary,
        )  # fmt: skip
    assert stopped.value.code == 2
    assert "resolved config hashes to" in capsys.readouterr().err
    assert not (tmp_path / "summary.md").exists()
