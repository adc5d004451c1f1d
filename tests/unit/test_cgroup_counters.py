"""The run cgroup's counter files as the verdict reads them (jail/cgroup.py), on files."""

from __future__ import annotations

from pathlib import Path

from sandboxd.jail import cgroup


def test_a_keyed_file_is_read_whole_and_skips_lines_without_a_number(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 3\nmax -1\noom_kill 2\nname word\n")
    assert cgroup._read_keyed(str(events)) == {"low": 0, "high": 3, "max": -1, "oom_kill": 2}


def test_an_absent_counter_file_reads_as_nothing(tmp_path: Path) -> None:
    assert cgroup._read_keyed(str(tmp_path / "pids.events")) == {}
    assert cgroup._read_int(str(tmp_path / "memory.peak")) is None


def test_a_single_value_file_is_an_int_or_none(tmp_path: Path) -> None:
    peak = tmp_path / "memory.peak"
    peak.write_text("2646016\n")
    assert cgroup._read_int(str(peak)) == 2646016
    peak.write_text("max\n")
    assert cgroup._read_int(str(peak)) is None


def test_unified_usage_comes_from_its_four_counter_files(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("low 0\nmax 1\noom 1\noom_kill 1\n")
    (tmp_path / "pids.events").write_text("max 4\n")
    (tmp_path / "cpu.stat").write_text("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n")
    (tmp_path / "memory.peak").write_text("8192\n")
    run = object.__new__(cgroup.UnifiedCgroup)  # its directory exists: no mkdir, no limits
    run.path = str(tmp_path)
    assert run.usage() == cgroup.Usage(
        oom_kills=1, pids_max_hits=4, cpu_usec=1234, peak_memory_bytes=8192
    )
