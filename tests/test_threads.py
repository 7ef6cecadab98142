"""torch threads sized to a step's share of the cores."""

import pytest
import torch

from refine_af import threads


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_parallel_shards_split_the_cores(restore_threads, monkeypatch) -> None:
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert threads.use_share_of_cores(2) == 4 == torch.get_num_threads()
    assert threads.use_share_of_cores() == 8 == torch.get_num_threads()
    assert threads.use_share_of_cores(16) == 1


def test_cgroup_quota_caps_the_cores(tmp_path, monkeypatch) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", quota)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert threads.available_cores() == 2
    quota.write_text("max 100000\n")
    assert threads.available_cores() == 64


def test_an_explicit_omp_num_threads_wins(restore_threads, monkeypatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert threads.use_share_of_cores() == 1 == torch.get_num_threads()


def test_parallel_shards_come_from_the_local_runner(monkeypatch) -> None:
    monkeypatch.delenv(threads.PARALLEL_SHARDS_ENV, raising=False)
    assert threads.parallel_shards() == 1
    monkeypatch.setenv(threads.PARALLEL_SHARDS_ENV, "2")
    assert threads.parallel_shards() == 2


@pytest.mark.parametrize(
    ("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")], ids=["default", "explicit"]
)
def test_threads_wait_passively_unless_told_otherwise(given, expected) -> None:
    """Set before torch loads (libgomp reads it once): importing any refine_af module first
    is enough, and the CLI, the components and the stages all do."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import refine_af.cli, os; import torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
