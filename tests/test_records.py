"""JSONL records: validation with file:line:field, atomic writes, journals."""

import json

import pytest

from refine_af import records
from refine_af.data import seed_tasks_path
from refine_af.errors import InputError
from refine_af.records import ExampleRecord, InstructionRecord, SeedTask


def test_bundled_seed_tasks_are_the_175_of_self_instruct():
    seeds = records.read_records(seed_tasks_path(), SeedTask)
    assert len(seeds) == 175
    assert len({s.id for s in seeds}) == 175
    assert sum(s.is_classification for s in seeds) > 0
    assert (seed_tasks_path().parent / "licenses" / "self-instruct-LICENSE").is_file()


def test_round_trip_and_blank_lines(tmp_path):
    rows = [
        InstructionRecord(id="a", instruction="Do x.", is_classification=False, source="seed"),
        InstructionRecord(id="b", instruction="Do y.", is_classification=True, source="machine"),
    ]
    path = tmp_path / "i.jsonl"
    assert records.write_jsonl(path, rows) == 2
    path.write_text(path.read_text() + "\n\n")
    assert records.read_records(path, InstructionRecord) == rows


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", r"x.jsonl:2: not valid JSON"),
        ("[1, 2]", r"x.jsonl:2: expected a JSON object, got list"),
        ('{"id": "e"}', r"x.jsonl:2: field 'instruction_id': Field required"),
        (
            '{"id": "e", "instruction_id": "i", "instruction": "x", "input": "",'
            ' "output": "y", "policy": "sft"}',
            r"x.jsonl:2: field 'policy'",
        ),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, line, message):
    good = ExampleRecord(
        id="e0", instruction_id="i", instruction="x", input="", output="y", policy="base"
    )
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(good.model_dump()) + "\n" + line + "\n")
    with pytest.raises(InputError, match=message):
        records.read_records(path, ExampleRecord)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope.jsonl: file not found"):
        records.read_records(tmp_path / "nope.jsonl", SeedTask)


def test_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "x.jsonl"
    records.write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        records.write_jsonl(path, rows())
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_corrupt_journal_line_in_the_middle_is_an_error(tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text('{"event": "round"}\n{bad\n{"event": "round"}\n')
    with pytest.raises(InputError, match=r"j.jsonl:2: corrupt journal line"):
        records.read_journal(journal)
