"""Run configuration: presets, overrides, unknown keys, hash."""

import subprocess
import sys
from pathlib import Path

import pytest

from refine_af.config import RunConfig, load_config, load_resolved, parse_override, preset_names
from refine_af.errors import InputError

CLI = str(Path(sys.executable).with_name("refine-af"))


def test_all_presets_load():
    assert preset_names() == [
        "local-cpu",
        "paper-llama2-13b",
        "paper-llama2-7b",
        "paper-mistral-7b",
    ]
    bases = {name: load_config(name).model.base for name in preset_names()}
    assert bases["paper-mistral-7b"] == "mistralai/Mistral-7B-v0.1"
    assert bases["paper-llama2-7b"] == "meta-llama/Llama-2-7b-hf"
    assert bases["paper-llama2-13b"] == "meta-llama/Llama-2-13b-hf"
    assert bases["local-cpu"] == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stage1.num_instructions=7", (["stage1", "num_instructions"], 7)),
        ("stage1.stop=['a', 'b']", (["stage1", "stop"], ["a", "b"])),
        ("stage1.detect_classification=false", (["stage1", "detect_classification"], False)),
        ("model.base=org/name", (["model", "base"], "org/name")),
    ],
)
def test_override_values_are_yaml(override, expected):
    assert parse_override(override) == expected


def test_overrides_apply_and_change_the_hash():
    base = load_config("local-cpu")
    changed = load_config("local-cpu", ["stage1.num_instructions=7"])
    assert changed.stage1.num_instructions == 7
    assert changed.config_hash() != base.config_hash()
    assert load_config("local-cpu").config_hash() == base.config_hash()


def test_hash_ignores_how_a_value_was_given(tmp_path):
    explicit = tmp_path / "run.yaml"
    explicit.write_text(load_config("local-cpu").to_yaml())
    assert load_config(str(explicit)).config_hash() == load_config("local-cpu").config_hash()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage1.num_instructionz=3"], "unknown config key stage1.num_instructionz"),
        (["nosuchsection.key=1"], "unknown config key nosuchsection"),
        (["stage1.num_instructions=0"], "stage1.num_instructions: Input should be greater"),
        (["stage1.prompt_machine_instructions=8"], "smaller than prompt_instructions"),
        (["stage1"], "expected section.key=value"),
        (["model.base.deeper=1"], "base is not a section"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(InputError, match=message):
        load_config("local-cpu", overrides)


def test_unknown_keys_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("stage1:\n  num_instructions: 3\n  colour: blue\n")
    with pytest.raises(InputError, match=r"mine.yaml: unknown config key stage1.colour"):
        load_config(str(path))


def test_missing_config_file_and_unknown_preset():
    with pytest.raises(InputError, match="config file not found"):
        load_config("missing.yaml")
    with pytest.raises(InputError, match="unknown preset"):
        load_config("local-gpu")


def test_defaults_follow_self_instruct():
    stage1 = RunConfig().stage1
    assert (stage1.prompt_instructions, stage1.prompt_machine_instructions) == (8, 2)
    assert stage1.similarity_threshold == 0.7
    assert (stage1.min_words, stage1.max_words) == (3, 150)


def test_config_show_prints_validated_yaml_and_hash():
    result = subprocess.run(
        [CLI, "config", "show", "--set", "stage1.num_instructions=9"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "num_instructions: 9" in result.stdout
    expected = load_config("local-cpu", ["stage1.num_instructions=9"]).config_hash()
    assert f"# config hash: {expected}" in result.stdout


def test_yaml_text_is_a_config_source():
    text = load_config("local-cpu", ["stage1.num_instructions=4"]).to_yaml()
    assert load_config(text).stage1.num_instructions == 4
    with pytest.raises(InputError, match=r"inline config: unknown config key stage1.nope"):
        load_config("stage1:\n  nope: 1\n")


def test_paper_presets_use_the_instruction_mining_reward_and_self_instruct_instances():
    for name in ("paper-mistral-7b", "paper-llama2-7b", "paper-llama2-13b"):
        config = load_config(name)
        reward = config.stage2.reward
        assert reward.formula == "instruction-mining"
        assert {c.scorer: c.weight for c in reward.components} == {
            "reward_model": 0.0078,
            "unieval.understandability": -0.4421,
            "unieval.naturalness": 0.3212,
            "unieval.coherence": 0.1520,
        }
        assert reward.bias == -0.0274
        assert config.stage3.format == "self_instruct"
        assert config.stage1.on_token_limit == "drop_response"
        # the resolved configuration (formula and the components it set) loads again
        assert load_config(config.to_yaml()).config_hash() == config.config_hash()
    local = load_config("local-cpu")
    assert local.stage2.reward.formula is None and local.stage3.format == "one_per_prompt"


def test_equal_weight_reward_is_a_named_option():
    config = load_config("paper-mistral-7b", ["stage2.reward.formula=equal-weight"])
    assert {c.weight for c in config.stage2.reward.components} == {1.0}
    assert config.stage2.reward.bias == 0.0
    with pytest.raises(InputError, match="formula 'instruction-mining' sets bias"):
        load_config("paper-mistral-7b", ["stage2.reward.bias=0.5"])


@pytest.mark.parametrize("preset", preset_names())
def test_a_resolved_config_loads_as_itself_and_checks_its_hash(preset):
    config = load_config(preset, ["stage1.num_instructions=3"])
    assert load_resolved(config.to_yaml(), config.config_hash()) == config
    with pytest.raises(InputError, match="not 'abc' as recorded"):
        load_resolved(config.to_yaml(), "abc")
    with pytest.raises(InputError, match=r"resolved config: unknown config key stage1\.nope"):
        load_resolved(config.to_yaml().replace("stage1:\n", "stage1:\n  nope: 1\n"), "abc")
