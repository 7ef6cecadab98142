"""run_local's step clock reads kfp.local's task log lines."""

import logging

from pipelines.run_local import StepClock


def record(message: str, created: float) -> logging.LogRecord:
    entry = logging.LogRecord("root", logging.INFO, __file__, 1, message, None, None)
    entry.created = created
    return entry


def test_steps_are_timed_from_start_to_finish_even_in_parallel() -> None:
    clock = StepClock()
    cyan, green, end = "\x1b[96m", "\x1b[92m", "\x1b[0m"
    lines = [
        (f"Executing task {cyan}'plan'{end}", 0.0),
        (f"Task {cyan}'plan'{end} finished with status {green}SUCCESS{end}", 2.0),
        (f"Executing task {cyan}'instances'{end}", 2.0),
        (f"Executing task {cyan}'instances'{end}", 2.5),
        ("Streamed logs:", 3.0),
        (f"Task {cyan}'instances'{end} finished with status {green}SUCCESS{end}", 62.0),
        (f"Task {cyan}'instances'{end} finished with status {green}SUCCESS{end}", 92.5),
    ]
    assert all(clock.filter(record(text, at)) for text, at in lines)
    assert clock.steps == [
        ("plan", 2.0, "SUCCESS"),
        ("instances", 60.0, "SUCCESS"),
        ("instances", 90.0, "SUCCESS"),
    ]
    table = clock.table(95.0)
    assert "plan       0:02.0  success" in table
    assert "instances  1:30.0  success" in table
    assert table.endswith("pipeline   1:35.0")
