"""Security review of batch runs: what a task, its owner and a lying site cannot do.

Each test names the secure behaviour; each failed on the code before its fix:

- a task's ``environment.variables`` (``LD_PRELOAD``) reached ``bwrap`` and the
  uid switch, which run as root outside (or before) the sandbox: root on the site;
- the site read a task's whole output into memory (``labgate run logs``, a failed
  attempt's tail, the collection), and a local site's agent is the portal's process;
- a task's result file was read whole by its (root) executor and stored whatever
  its size; JSON with ``NaN`` was stored too, and then every view of the run was a 500;
- the task gateway took numbers the database or JSON cannot hold (500s);
- a note's ``data`` had no size, a site's report no bound at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from runs_helpers import submit, tasks_of, wait_run
from sqlalchemy import func, select

from labgate.agent import tasks as agent_tasks
from labgate.agent.tasks import TaskRunner
from labgate.db.runs import RunEvent, RunTask, TaskAttempt
from labgate.errors import BadRequest
from labgate.scheduler import runs as scheduler_runs
from labgate.security import executor_token, task_token
from labgate.wire.site import Report

SLOW = """
name = "review"
[[stages]]
name = "one"
[[stages.tasks]]
name = "slow"
command = "sleep 30"
where = {site = "alpha"}
"""


async def _attempt(app: Any, run_id: str) -> str:
    def find(session: Any) -> list[str]:
        return list(
            session.scalars(
                select(TaskAttempt.id)
                .join(RunTask, RunTask.id == TaskAttempt.task_id)
                .where(RunTask.run_id == run_id)
                .order_by(TaskAttempt.number)
            )
        )

    deadline = time.monotonic() + 30
    while not (found := await app.state.portal.run_db(find)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    return found[0]


async def _readable(client: Any, headers: dict[str, str], run_id: str) -> dict[str, Any]:
    """The run's view and its events: both answer 200 (never a 500), in strict JSON (a
    ``NaN`` in them is no JSON the browser's run page parses)."""
    answers = []
    for url in (f"/api/v1/runs/{run_id}", f"/api/v1/runs/{run_id}/events", "/api/v1/runs"):
        answer = await client.get(url, headers=headers)
        assert answer.status_code == 200, answer.text
        answers.append(json.loads(answer.text, parse_constant=_not_json))
    return dict(answers[0])


def _not_json(name: str) -> Any:
    raise AssertionError(f"the API answered {name}, which is not JSON")


# --- the task's environment and the sandbox ---------------------------------------------

PRELOAD_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    const char *out = getenv("REVIEW_PRELOAD_OUT");
    FILE *f;
    if (out == NULL) return;
    f = fopen(out, "a");
    if (f == NULL) return;
    fprintf(f, "uid=%d\n", (int)geteuid());
    fclose(f);
}
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the probe")
async def test_a_tasks_variables_never_reach_the_sandbox_or_the_uid_switch(
    app, client, make_user, tmp_path
):
    # The user's library (in a real attack: in their venv, their workspace, a result of an
    # earlier stage), named in the run's environment.variables.
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    probe_dir.chmod(0o755)
    source = probe_dir / "planted.c"
    source.write_text(PRELOAD_SOURCE)
    library = probe_dir / "planted.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60
    )
    marker = probe_dir / "loaded-by"
    alice = await make_user("alice")
    definition = f"""
name = "preload"
[[stages]]
name = "one"
[[stages.tasks]]
name = "t"
command = '''printf '"%s"' "$LD_PRELOAD" > $LABGATE_RESULT'''
where = {{site = "alpha"}}
environment = {{variables = {{LD_PRELOAD = "{library}", REVIEW_PRELOAD_OUT = "{marker}"}}}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id)
    assert run["state"] == "succeeded", run
    loaded = marker.read_text() if marker.exists() else ""
    # The sandbox (bwrap) and the uid switch run outside the task's reach, as root where
    # labgate is root: the task's variables are the task's, set only once it is the task.
    assert loaded == "", f"the task's LD_PRELOAD ran outside its sandbox: {loaded!r}"
    assert tasks_of(run)["t"]["result"] == str(library), run  # still the task's own


async def test_a_tasks_token_and_variables_stay_off_command_lines(app, client, make_user, settings):
    # Any local account reads every process's command line in /proc: the task's token and
    # its variables (an API key of the owner's) travel in its environment, not there.
    secret = "review-secret-" + os.urandom(6).hex()
    alice = await make_user("alice")
    definition = f"""
name = "cmdline"
[[stages]]
name = "one"
[[stages.tasks]]
name = "t"
command = "sleep 1.5"
where = {{site = "alpha"}}
environment = {{variables = {{API_KEY = "{secret}"}}}}
"""
    run_id = await submit(client, alice, definition)
    attempt = await _attempt(app, run_id)
    token = task_token(settings.secret_key.get_secret_value(), attempt)
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                        text = cmdline.read().decode(errors="replace")
                except OSError:
                    continue
                if secret in text or token in text:
                    seen.append(text.replace("\0", " "))
        view = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
        if view["state"] not in ("pending", "running"):
            break
        await asyncio.sleep(0.02)
    assert view["state"] == "succeeded", view
    assert not seen, seen[:1]


async def test_the_tasks_variables_are_still_the_tasks(app, client, make_user):
    alice = await make_user("alice")
    definition = """
name = "variables"
[[stages]]
name = "one"
[[stages.tasks]]
name = "t"
command = '''
printf '["%s", "%s", "%s"]' "$GREETING" "$SPACED" "$LABGATE_TASK" > $LABGATE_RESULT
'''
where = {site = "alpha"}
environment = {variables = {GREETING = "hello=world", SPACED = "a b  c"}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id)
    assert run["state"] == "succeeded", run
    assert tasks_of(run)["t"]["result"] == ["hello=world", "a b  c", "t"], run


# --- what the site reads of a task ------------------------------------------------------


def _peak(fn: Any) -> tuple[Any, int]:
    """``fn()`` and the most memory Python held meanwhile (bytes)."""
    tracemalloc.start()
    try:
        answer = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return answer, peak


def test_the_site_reads_a_tasks_output_from_its_end_only(tmp_path):
    runner = TaskRunner("alpha", lambda _r: asyncio.sleep(0), tmp_path / "tasks")
    attempt = "0123456789abcdef"
    directory = runner.directory(attempt)
    directory.mkdir(parents=True)
    # 96 MiB of output (a task may write for an hour), the last lines what matters.
    with open(directory / "output.log", "wb") as out:
        line = b"x" * 1023 + b"\n"
        for _ in range(96 * 1024):
            out.write(line)
        out.write(b"the end\n")

    text, peak = _peak(lambda: asyncio.run(runner.logs(attempt, 2)))
    assert text.endswith("the end\n"), text[-100:]
    assert peak < 16 * 2**20, f"reading 2 lines held {peak / 2**20:.0f} MiB"

    from labgate.agent.tasks import Outcome

    report, peak = _peak(lambda: runner._final(attempt, directory, Outcome(state="failed")))
    assert report.log_tail.endswith("the end"), report.log_tail[-100:]
    assert peak < 16 * 2**20, f"a failure's tail held {peak / 2**20:.0f} MiB"


def test_packing_results_stops_at_the_limit_without_holding_a_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_tasks, "MAX_RESULTS_ARCHIVE", 4 * 2**20)
    results = tmp_path / "results"
    results.mkdir()
    with open(results / "big.bin", "wb") as out:  # incompressible, 8 times the limit
        for _ in range(32):
            out.write(os.urandom(2**20))

    def pack() -> str:
        try:
            agent_tasks.pack(results)
        except BadRequest as exc:
            return str(exc.detail)
        return ""

    refused, peak = _peak(pack)
    assert "larger than 4 MiB" in refused, refused
    assert peak < 12 * 2**20, f"packing held {peak / 2**20:.0f} MiB past a 4 MiB limit"


# --- a task's result --------------------------------------------------------------------


async def test_a_tasks_result_past_one_mib_fails_the_task_and_is_not_stored(app, client, make_user):
    alice = await make_user("alice")
    definition = """
name = "bigresult"
[[stages]]
name = "one"
[[stages.tasks]]
name = "t"
command = '''
python3 -c "import json,os; json.dump('x'*2**21, open(os.environ['LABGATE_RESULT'],'w'))"'''
where = {site = "alpha"}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id)
    task = tasks_of(run)["t"]
    assert run["state"] == "failed", {k: v for k, v in task.items() if k != "result"}
    assert task["result"] is None
    assert "1 MiB" in task["reason"], task["reason"]


async def test_a_tasks_result_that_is_not_strict_json_fails_the_task_and_the_run_stays_readable(
    app, client, make_user
):
    alice = await make_user("alice")
    definition = """
name = "nan"
[[stages]]
name = "one"
[[stages.tasks]]
name = "t"
command = "echo '[NaN, Infinity]' > $LABGATE_RESULT"
where = {site = "alpha"}
"""
    run_id = await submit(client, alice, definition)
    deadline = time.monotonic() + 60
    while True:
        view = await _readable(client, alice, run_id)
        if view["state"] not in ("pending", "running"):
            break
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.1)
    task = tasks_of(view)["t"]
    assert view["state"] == "failed" and task["result"] is None, view
    assert "JSON" in task["reason"], task


# --- the task gateway -------------------------------------------------------------------


async def test_the_gateway_refuses_numbers_it_cannot_keep_with_a_400(
    app, client, make_user, settings
):
    key = settings.secret_key.get_secret_value()
    alice = await make_user("alice")
    run_id = await submit(client, alice, SLOW)
    attempt = await _attempt(app, run_id)
    executor = {"Authorization": f"Bearer {executor_token(key, attempt)}"}
    task = {"Authorization": f"Bearer {task_token(key, attempt)}"}
    state = f"/api/v1/tasks/{attempt}/state"
    events = f"/api/v1/tasks/{attempt}/events"
    headers = {"Content-Type": "application/json"}
    for body in (
        '{"state": "failed", "exit_code": 100000000000000000000000}',
        '{"state": "failed", "exit_code": 1, "seconds": Infinity}',
        '{"state": "succeeded", "exit_code": 0, "result": [NaN]}',
        '{"state": "succeeded", "exit_code": 0, "result": {"a": -Infinity}}',
    ):
        answer = await client.post(state, content=body, headers={**headers, **executor})
        assert answer.status_code == 400, (body, answer.status_code, answer.text)
        assert answer.json()["error"], answer.text
    for body in (
        '{"message": "m", "data": {"a": NaN}}',
        '{"message": "m", "data": {"a": [1, Infinity]}}',
    ):
        answer = await client.post(events, content=body, headers={**headers, **task})
        assert answer.status_code == 400, (body, answer.status_code, answer.text)
    # Nothing of it was kept: the run reads, and it still runs.
    view = await _readable(client, alice, run_id)
    assert tasks_of(view)["slow"]["state"] == "running", view
    await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)


async def test_a_notes_data_is_bounded(app, client, make_user, settings):
    key = settings.secret_key.get_secret_value()
    alice = await make_user("alice")
    run_id = await submit(client, alice, SLOW)
    attempt = await _attempt(app, run_id)
    task = {"Authorization": f"Bearer {task_token(key, attempt)}"}
    events = f"/api/v1/tasks/{attempt}/events"
    # 50 keys of 16 KiB each: 800 KiB of data per note, a thousand notes per task copy.
    big = {f"k{i}": "x" * 16384 for i in range(50)}
    answer = await client.post(events, json={"message": "big", "data": big}, headers=task)
    assert answer.status_code == 400, answer.text
    assert "data" in answer.json()["detail"], answer.text
    small = await client.post(events, json={"message": "fine", "data": {"done": 0.5}}, headers=task)
    assert small.status_code == 204, small.text
    await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)


# --- a site that lies -------------------------------------------------------------------


async def test_a_sites_report_on_its_task_is_bounded_before_it_is_kept(app, client, make_user):
    alice = await make_user("alice")
    run_id = await submit(client, alice, SLOW)
    attempt = await _attempt(app, run_id)
    processor = app.state.portal.run_processor
    # A report a lying agent may send over its connection (16 MiB a message): a result the
    # view cannot serialize, text of any length, an exit code the database cannot hold.
    await processor.apply(
        Report(
            attempt,
            "failed",
            kind="task",
            message="m" * 3_000_000,
            log_tail="l" * 3_000_000,
            data={
                "exit_code": 10**30,
                "result": [float("nan")],
                "files": ["f" * 100_000, 7, None] + ["x"] * 5000,
                "seconds": float("inf"),
            },
        ),
        site="alpha",
    )
    view = await _readable(client, alice, run_id)
    task = tasks_of(view)["slow"]
    assert task["state"] == "failed", task
    assert task["exit_code"] is None and task["result"] is None, task
    assert len(task["reason"]) <= 4000, len(task["reason"])
    events = (await client.get(f"/api/v1/runs/{run_id}/events", headers=alice)).json()
    kept = json.dumps(events)
    assert len(kept) < 200_000, f"a report's event kept {len(kept):,} bytes"


async def test_a_site_cannot_flood_a_runs_events_with_preparing_notes(
    app, client, make_user, monkeypatch
):
    monkeypatch.setattr(scheduler_runs, "MAX_NOTES", 5)
    alice = await make_user("alice")
    run_id = await submit(client, alice, SLOW)
    attempt = await _attempt(app, run_id)
    processor = app.state.portal.run_processor
    for i in range(20):
        await processor.apply(
            Report(attempt, "preparing", kind="task", message=f"step {i}"), site="alpha"
        )

    def count(session: Any) -> int:
        return int(
            session.scalar(
                select(func.count()).where(RunEvent.run_id == run_id, RunEvent.state == "preparing")
            )
            or 0
        )

    assert await app.state.portal.run_db(count) <= 5
    await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)


def test_a_task_containers_output_is_read_as_a_stream_and_only_its_end_kept():
    from labgate.backends import container_tasks

    class Api:
        def logs(self, name: str, **options: Any) -> Any:
            if not options.get("stream"):  # the whole output at once: what a site must not do
                return b"x" * (64 * 2**20) + b"the end\n"
            assert options.get("follow") is False, options
            return iter([b"x" * 2**20] * 64 + [b"the end\n"])

    class Backend:
        class client:
            api = Api()

    kept = container_tasks.task_logs(Backend(), "labgate-x-task-0123456789abcdef")  # type: ignore[arg-type]
    assert kept.endswith(b"the end\n")
    assert len(kept) <= 16 * 2**20, f"kept {len(kept) / 2**20:.0f} MiB of a task's output"


# --- a task's Python requirements, installed by the site's agent ------------------------

IN_TREE_BACKEND = """
import os
open({marker!r}, "a").write("uid=%d\\n" % os.geteuid())
def get_requires_for_build_wheel(config_settings=None):
    return []
"""


def _project(directory: Path, marker: Path) -> Path:
    """A source tree whose build backend (run by whoever builds it) leaves ``marker``."""
    project = directory / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        '[project]\nname = "proj"\nversion = "1.0"\n'
    )
    (project / "backend.py").write_text(IN_TREE_BACKEND.format(marker=str(marker)))
    return project


async def _submit_requirement(client: Any, headers: dict[str, str], requirement: str) -> Any:
    """The answer to a run of one task whose Python requirements are ``[requirement]``."""
    definition = f"""
name = "requirements"
[[stages]]
name = "one"
[[stages.tasks]]
name = "t"
command = "true"
where = {{site = "alpha"}}
environment = {{python = ["{requirement}"]}}
"""
    return await client.post(
        "/api/v1/runs", content=definition, headers={**headers, "Content-Type": "text/plain"}
    )


async def test_a_tasks_requirements_carry_no_pip_option(app, client, make_user, tmp_path):
    secret = tmp_path / "root-only.txt"
    secret.write_text("root-only-line-SECRET123\n")
    secret.chmod(0o600)
    alice = await make_user("alice")
    for requirement in (f"--requirement={secret}", f"-r{secret}", "--index-url=http://x/"):
        answer = await _submit_requirement(client, alice, requirement)
        assert answer.status_code == 400, (requirement, answer.status_code, answer.text)
        assert answer.json()["error"] == "invalid_run", answer.text
        assert "SECRET123" not in answer.text
    # And a site refuses them whatever a portal sends.
    from labgate.agent.taskenv import EnvironmentCache

    cache = EnvironmentCache(tmp_path / "envs")
    with pytest.raises(BadRequest) as refused:
        await cache.prepare([f"-r{secret}"], lambda _m: asyncio.sleep(0))
    assert "SECRET123" not in str(refused.value.detail)
    assert not (tmp_path / "envs").exists() or not any((tmp_path / "envs").iterdir())


async def test_a_tasks_requirements_are_never_built_from_source_by_the_agent(
    app, client, make_user, tmp_path
):
    marker = tmp_path / "built-by"
    project = _project(tmp_path, marker)
    alice = await make_user("alice")
    for requirement in (str(project), f"proj @ file://{project}"):
        answer = await _submit_requirement(client, alice, requirement)
        assert answer.status_code == 400, (requirement, answer.status_code, answer.text)
    assert not marker.exists(), marker.read_text()
    # A site: neither a source tree nor a wheel that names one as its dependency.
    from runs_helpers import make_wheel

    from labgate.agent.taskenv import EnvironmentCache

    cache = EnvironmentCache(tmp_path / "envs")
    with pytest.raises(BadRequest):
        await cache.prepare([str(project)], lambda _m: asyncio.sleep(0))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = make_wheel(wheels, "front", "VALUE = 1\n")
    _add_dependency(wheel, f"proj @ file://{project}")
    with contextlib.suppress(BadRequest):  # refusing it is fine; building its dependency is not
        await cache.prepare([str(wheel)], lambda _m: asyncio.sleep(0))
    assert not marker.exists(), f"the agent ran the owner's build code: {marker.read_text()}"


def _add_dependency(wheel: Path, requirement: str) -> None:
    """Rewrite a test wheel so that its metadata requires ``requirement``."""
    import base64
    import hashlib
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    meta = next(name for name in files if name.endswith(".dist-info/METADATA"))
    files[meta] = files[meta] + f"Requires-Dist: {requirement}\n".encode()
    record = next(name for name in files if name.endswith(".dist-info/RECORD"))
    lines = []
    for name, data in files.items():
        if name == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    lines.append(f"{record},,")
    files[record] = ("\n".join(lines) + "\n").encode()
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
