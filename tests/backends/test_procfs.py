"""/proc scans of the process backend: shared between concurrent stops, markers read once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labgate.backends import procfs
from labgate.backends.procfs import MARKER_VAR, instance_processes, scan


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def spawn(started: list[subprocess.Popen[bytes]], script: str, marker: str | None) -> int:
    env = {"PATH": os.environ["PATH"]}
    if marker is not None:
        env[MARKER_VAR] = marker
    process = subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True)
    started.append(process)
    return process.pid


def wait_until(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_concurrent_callers_share_one_scan_and_a_new_process_is_seen_by_a_fresh_one(processes):
    first = scan(max_age=0)
    assert scan(max_age=60) is first  # a second stop polling now reads no /proc
    pid = spawn(processes, "sleep 30", "i-new")
    assert pid not in scan(max_age=60).procs  # that scan is older than the process
    fresh = scan(max_age=0)
    assert fresh is not first and pid in fresh.procs
    # A scan that meets the shell in the middle of its exec of sleep reads no
    # environment and leaves the process unmarked until the next scan.
    wait_until(lambda: scan(max_age=0).markers.get(pid) == b"i-new")


def test_marked_processes_are_found_by_exact_id_even_out_of_the_tree(processes):
    # setsid + a shell that exits: the sleep is re-parented, out of any tree we track.
    spawn(processes, "setsid sleep 30 & sleep 30", "i-one")
    spawn(processes, "sleep 30", "i-one-other")  # an id with ours as its prefix
    spawn(processes, "sleep 30", None)

    def marked() -> dict[int, int]:
        procfs.scan(max_age=0)
        return instance_processes("i-one", 0, {})

    wait_until(lambda: len(marked()) >= 3)  # sh, its sleep, the setsid sleep
    table = scan(max_age=0)
    found = marked()
    assert all(table.markers[pid] == b"i-one" for pid in found)
    assert not any(table.markers.get(pid) == b"i-one-other" for pid in found)


def test_a_process_that_drops_its_marker_after_it_was_seen_is_still_the_instances(processes):
    # The shell is seen with the marker, then replaces itself with a sleep with no environment.
    pid = spawn(processes, "sleep 1; exec env -i sleep 30", "i-drops")
    scan(max_age=0)
    assert pid in instance_processes("i-drops", 0, {})
    wait_until(lambda: Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0030\x00")
    assert MARKER_VAR.encode() not in Path(f"/proc/{pid}/environ").read_bytes()  # no longer says so
    scan(max_age=0)
    assert pid in instance_processes("i-drops", 0, {})


def test_a_process_seen_before_it_execs_with_the_marker_under_the_same_name_is_found(processes):
    """The launcher labgate forks keeps the server's name ("python") when it execs with the marker.

    Seen unmarked between fork and exec, this process's child must not be taken
    for unmarked after (a launch sent again after a killed agent's start then
    ran the tool twice).
    """
    marked = {"PATH": os.environ["PATH"], MARKER_VAR: "i-same-name"}
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(30)']"
    script = (
        f"import os, sys; sys.stdin.readline(); os.execve(sys.executable, {sleeper}, {marked!r})"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, env={"PATH": os.environ["PATH"]}
    )
    processes.append(process)
    wait_until(lambda: b"readline" in Path(f"/proc/{process.pid}/cmdline").read_bytes())
    before = scan(max_age=0)
    assert process.pid in before.procs and process.pid not in before.markers
    assert process.stdin is not None
    process.stdin.write(b"go\n")
    process.stdin.flush()
    environ = Path(f"/proc/{process.pid}/environ")
    wait_until(lambda: MARKER_VAR.encode() in environ.read_bytes())
    after = scan(max_age=0)
    assert after.procs[process.pid].name == before.procs[process.pid].name  # same name
    assert after.markers.get(process.pid) == b"i-same-name"
    assert process.pid in instance_processes("i-same-name", 0, {})


def test_a_look_since_a_moment_sees_a_process_started_after_the_last_shared_scan(processes):
    """A stop's first look: a scan shared from before may predate what it must stop."""
    first = scan(max_age=0)
    pid = spawn(processes, "sleep 30", "i-late")
    wait_until(lambda: MARKER_VAR.encode() in Path(f"/proc/{pid}/environ").read_bytes())
    assert scan(max_age=60) is first and pid not in first.procs  # the shared one is older
    now = time.monotonic()
    assert pid in instance_processes("i-late", 0, {}, since=now)
    assert scan(max_age=60, since=now) is not first  # and later callers share the new one
    assert scan(max_age=60, since=now) is scan(max_age=60, since=now)
