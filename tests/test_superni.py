"""superni: the official metric against rouge_score, the data reader and the subset."""

import gzip
import json
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from refine_af import superni
from refine_af.errors import InputError


def _instance(task: str, n: int, **extra: object) -> dict:
    return {
        "task": task,
        "id": f"{task}-{n}",
        "definition": f"Do {task}.",
        "input": f"input {n}",
        "references": [f"answer {n}"],
        **extra,
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- metric ------------------------------------------------------------------------------

PAIRS = [
    ("The cats were running quickly.", ["the cat runs quickly"]),
    ("Yes", ["No", "yes"]),
    ("entailment", ["Entailment"]),
    ("He gave it to her", ["she", "her", "him"]),
    ("", ["anything"]),
    ("a completely unrelated sentence", ["the answer is forty two", "forty-two"]),
    ("Running runners ran", ["run"]),
]


@pytest.mark.parametrize(("prediction", "references"), PAIRS)
def test_rouge_l_is_official_superni_metric(prediction: str, references: list[str]) -> None:
    """Same figures as natural-instructions' evaluation.py: rougeL F, stemmer, max, ×100."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)
    assert superni.rouge_l(prediction, references) == pytest.approx(100.0 * expected)


def test_rouge_l_fixed_values() -> None:
    assert superni.rouge_l("The cats were running quickly.", ["the cat runs quickly"]) == (
        pytest.approx(100 * 2 * 0.8 * 1.0 / 1.8)  # stems: the cat (were) run quickli; P=4/5, R=1
    )
    assert superni.rouge_l("Yes", ["No", "yes"]) == 100.0  # best reference, case-insensitive
    assert superni.rouge_l("", ["anything"]) == 0.0


def test_aggregate_means_per_task_then_over_tasks() -> None:
    rows = [_instance("a", 0), _instance("a", 1), _instance("b", 0)]
    instances = [superni.SuperNIInstance.model_validate(r) for r in rows]
    result = superni.aggregate(instances, [100.0, 0.0, 20.0], model="m", data="d")
    assert result.tasks["a"].rougeL == 50.0
    assert result.tasks["b"].rougeL == 20.0
    assert result.rougeL == 35.0  # tasks weigh the same
    assert result.rougeL_instances == pytest.approx(40.0)  # the official overall
    assert result.instances == 3
    assert result.categories == {}  # none in the data: none invented


def test_categories_only_when_the_data_names_them() -> None:
    rows = [_instance("a", 0, task_category="QA"), _instance("b", 0, category="Title")]
    instances = [superni.SuperNIInstance.model_validate(r) for r in rows]
    result = superni.aggregate(instances, [10.0, 30.0], model="m", data="d")
    assert result.categories == {"QA": 10.0, "Title": 30.0}
    assert result.tasks["a"].category == "QA"


# --- data --------------------------------------------------------------------------------


def test_bundled_test_set_loads() -> None:
    instances, uri = superni.read_instances(None)
    assert uri.endswith("superni_test.jsonl.gz")
    groups = superni.by_task(instances)
    assert len(groups) == 103
    assert len(instances) == 10210
    assert next(iter(groups)) == "task893_gap_fill_the_blank_coreference_resolution"
    assert all(len(group) <= 100 for group in groups.values())


def test_reads_plain_and_gzipped_files(tmp_path: Path) -> None:
    rows = [_instance("a", 0), _instance("a", 1)]
    plain = _write(tmp_path / "t.jsonl", rows)
    packed = tmp_path / "t.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert superni.read_instances(str(plain))[0] == superni.read_instances(str(packed))[0]


_NO_REFS = '{"task": "a", "id": "1", "definition": "d", "input": "x"'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no evaluation instances"),
        (_NO_REFS + "}\n", ":1: field 'references': Field required"),
        (_NO_REFS + ', "references": []}\n', ":1: field 'references'"),
        ("not json\n", ":1: not valid JSON"),
    ],
)
def test_bad_data_names_file_and_field(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as caught:
        superni.read_instances(str(path))
    assert str(path) in str(caught.value)


def test_duplicate_ids_missing_file_and_broken_gzip(tmp_path: Path) -> None:
    dup = _write(tmp_path / "dup.jsonl", [_instance("a", 0), _instance("a", 0)])
    with pytest.raises(InputError, match="appears more than once"):
        superni.read_instances(str(dup))
    with pytest.raises(InputError, match="file not found"):
        superni.read_instances(str(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(InputError, match="not a valid gzip"):
        superni.read_instances(str(broken))


def test_select_is_deterministic_and_takes_the_first_instances() -> None:
    rows = [_instance(f"t{t}", n) for t in range(6) for n in range(4)]
    instances = [superni.SuperNIInstance.model_validate(r) for r in rows]
    first = superni.select(instances, 3, 2, seed=7, source="s")
    assert first == superni.select(instances, 3, 2, seed=7, source="s")
    tasks = list(superni.by_task(first))
    assert len(tasks) == 3
    assert tasks == sorted(tasks, key=lambda name: int(name[1:]))  # file order kept
    assert [i.id for i in first[:2]] == [f"{tasks[0]}-0", f"{tasks[0]}-1"]
    named = superni.select(instances, ["t5", "t1"], None, seed=0, source="s")
    assert list(superni.by_task(named)) == ["t1", "t5"]
    assert len(named) == 8
    assert len(superni.select(instances, None, None, seed=0, source="s")) == 24
    with pytest.raises(InputError, match="no instances of task"):
        superni.select(instances, ["nope"], None, seed=0, source="s")


def test_prompt_holds_definition_and_input_only() -> None:
    instance = superni.SuperNIInstance.model_validate(_instance("a", 0))
    prompt = superni.encode_prompt("D: {definition}\nI: {input}\nO:", instance)
    assert prompt == "D: Do a.\nI: input 0\nO:"


def test_result_file_round_trip_and_bad_result(tmp_path: Path) -> None:
    instances = [superni.SuperNIInstance.model_validate(_instance("a", 0))]
    result = superni.aggregate(instances, [12.5], model="m", data="d")
    path = tmp_path / "evaluation.json"
    path.write_text(result.model_dump_json())
    assert superni.read_result(str(path)) == result
    path.write_text('{"model": "m"}')
    with pytest.raises(InputError, match="not a stage 5 evaluation result"):
        superni.read_result(str(path))
