"""Tasks in containers on real Podman: an image, a requirements image made once, limits.

Needs root and Podman (see tests/podman.py); skips without them, fails without
them in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.errors import APIError
from runs_helpers import make_wheel, submit, tasks_of, wait_run

import podman
from labgate.backends.container_tasks import ENV_REPOSITORY
from labgate.backends.containers import LABEL_SNAPSHOT
from labgate.backends.images import LOCAL_SNAPSHOTS
from labgate.config import Settings, SiteConfig
from labgate.security import task_token
from podman import BUSYBOX_IMAGE, RUN, Engine

engine = podman.engine
deployment = podman.deployment
#: The test images' Debian with python3 (scripts/build-test-images.sh).
PYTHON_IMAGE = "localhost/labgate/bookworm-python:latest"


@pytest.fixture
def settings(settings: Settings, engine: Engine, deployment: str) -> Settings:
    """A process site ``alpha`` and a containers site ``box`` on the run's Podman."""
    box = SiteConfig.model_validate(
        {**engine.site("box", deployment=deployment), "labels": {"tier": "c"}}
    )
    return settings.model_copy(
        update={
            "sites": [SiteConfig(name="alpha", backend="process"), box],
            "reconcile_interval": 0,
        }
    )


def task_containers(engine: Engine, deployment: str, *, running: bool = False) -> list[str]:
    """The task containers of this test (only the running ones with ``running``)."""
    found = []
    for container_id in engine.containers_of(deployment):
        try:
            attrs = engine.client.api.inspect_container(container_id)
        except APIError:  # removed between the listing and now
            continue
        is_task = "labgate.task" in (attrs["Config"]["Labels"] or {})
        if is_task and (attrs["State"]["Running"] or not running):
            found.append(container_id)
    return found


def running_tasks(engine: Engine, deployment: str) -> list[str]:
    return task_containers(engine, deployment, running=True)


async def test_an_image_task_runs_in_a_container_and_its_results_come_back(
    client, make_user, engine, deployment, settings
):
    alice = await make_user("alice")
    script = (
        "id -u > $LABGATE_RESULTS_DIR/uid.txt; echo $LABGATE_TASK > $LABGATE_RESULTS_DIR/who.txt;"
        " cat /proc/self/status > $LABGATE_RESULTS_DIR/status; ls / > $LABGATE_RESULTS_DIR/root;"
        " echo '[1, 2]' > $LABGATE_RESULT; echo hello from the box"
    )
    definition = f"""
name = "boxed"
[[stages]]
name = "one"
[[stages.tasks]]
name = "inside"
command = {json.dumps(script)}
environment = {{image = "{BUSYBOX_IMAGE}"}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=90)
    assert run["state"] == "succeeded", run
    task = tasks_of(run)["inside"]
    assert task["site"] == "box"  # an image task goes to the containers site only
    assert task["result"] == [1, 2]
    assert sorted(task["files"]) == ["root", "status", "uid.txt", "who.txt"]
    kept = settings.workspaces_dir / "alice" / "runs" / run_id / "inside"
    assert (kept / "who.txt").read_text().strip() == "inside"
    assert (kept / "uid.txt").read_text().strip() == "1000"  # the image's user, never root
    status = dict(
        line.split(":", 1) for line in (kept / "status").read_text().splitlines() if ":" in line
    )
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    # The image's own files and /labgate (the results directory); nothing of the site's disk.
    assert sorted((kept / "root").read_text().split()) == sorted(
        ["bin", "dev", "etc", "home", "labgate", "proc", "run", "sys", "tmp", "www"]
    )
    logs = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "inside"}, headers=alice)
    assert "hello from the box" in logs.json()["text"]
    assert task_containers(engine, deployment) == []  # removed once it ended


@pytest.fixture
def env_images(engine: Engine) -> Iterator[None]:
    """Requirements images made during the test are removed after it."""
    before = image_tags(engine)
    yield
    for tag in image_tags(engine) - before:
        if tag.startswith(ENV_REPOSITORY):
            with contextlib.suppress(APIError):
                engine.client.images.remove(tag, force=True)


def image_tags(engine: Engine) -> set[str]:
    """Every tag on the engine, in one listing (no look at each image: another test may be
    removing one meanwhile); Podman's listing itself can fail on an image being removed, so
    it is asked again."""
    for _ in range(10):
        try:
            return {tag for image in engine.client.api.images() for tag in image["RepoTags"] or []}
        except APIError:
            time.sleep(0.2)
    return {tag for image in engine.client.api.images() for tag in image["RepoTags"] or []}


async def test_a_requirements_image_is_built_once_and_runs_a_callable(
    client, make_user, engine, deployment, shelf: Path, env_images
):
    alice = await make_user("alice")
    wheel = make_wheel(shelf, "labgate_box_pkg", "def answer(x):\n    return {'twice': 2 * x}\n")
    definition = f"""
name = "reqs"
[[stages]]
name = "one"
[[stages.tasks]]
name = "first"
callable = "labgate_box_pkg:answer"
args = {{x = 21}}
environment = {{python = ["{wheel}"], image = "{PYTHON_IMAGE}"}}
[[stages.tasks]]
name = "second"
command = ["python3", "-c", "import labgate_box_pkg, os; print(os.getuid())"]
environment = {{python = ["{wheel}"], image = "{PYTHON_IMAGE}"}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=300)
    assert run["state"] == "succeeded", run
    tasks = tasks_of(run)
    assert tasks["first"]["result"] == {"twice": 42}
    assert {t["site"] for t in tasks.values()} == {"box"}
    notes = [e["message"] for e in run["events"] if e["state"] == "preparing"]
    assert sum("preparing image" in n for n in notes) == 1, notes  # one list, one build
    assert any(n.endswith("ready") for n in notes)
    logs = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "second"}, headers=alice)
    assert logs.json()["text"].strip() == "1000"

    # Another run with the same list and base reuses the image: nothing is prepared.
    again = await submit(client, alice, definition.replace('name = "reqs"', 'name = "again"'))
    run = await wait_run(client, alice, again, timeout=90)
    assert run["state"] == "succeeded", run
    assert not [e for e in run["events"] if e["state"] == "preparing"]


@pytest.fixture
def snapshot_image(engine: Engine) -> Iterator[str]:
    """An image snapshot of alice's as the containers backend commits one (its label).

    Tagged other than by its snapshot id (a real one's tag), or the snapshot
    collection of another test's portal on the same engine would remove it (no
    such snapshot in its database).
    """
    reference = f"{LOCAL_SNAPSHOTS}/alice/demo:kept-{RUN}"
    container = engine.client.containers.create(BUSYBOX_IMAGE, ["true"])
    try:
        container.commit(
            repository=reference.rsplit(":", 1)[0],
            tag=reference.rsplit(":", 1)[1],
            changes=[f'LABEL {LABEL_SNAPSHOT}="s{RUN}"'],
        )
    finally:
        container.remove(force=True)
    yield reference
    with contextlib.suppress(APIError):
        engine.client.images.remove(reference, force=True)


async def test_a_task_may_run_no_snapshot_and_no_other_runs_requirements_image(
    client, make_user, engine, deployment, shelf: Path, snapshot_image: str
):
    """Both hold one user's work (their files; packages from wheel files only they could
    read): named by tag, by image id or by an id's prefix, neither runs nor is built on."""
    alice, bob = await make_user("alice"), await make_user("bob")
    wheel = make_wheel(shelf, "labgate_alices_pkg", "SECRET = 'alice only'\n")
    definition = f"""
name = "mine"
[[stages]]
name = "one"
[[stages.tasks]]
name = "prepare"
command = ["true"]
environment = {{python = ["{wheel}"], image = "{PYTHON_IMAGE}"}}
"""
    run = await wait_run(client, alice, await submit(client, alice, definition), timeout=300)
    assert run["state"] == "succeeded", run
    ready = [e["message"] for e in run["events"] if e["message"].endswith(" ready")]
    built = ready[0].rpartition("image ")[2].removesuffix(" ready")
    assert built.startswith(ENV_REPOSITORY + ":"), ready
    # A second name of the test's own keeps the image while other tests clean theirs up.
    keep = f"localhost/labgate-test-keep/{RUN}"
    engine.client.api.tag(built, keep, "env")
    try:
        await bob_is_refused(client, engine, bob, built, snapshot_image)
    finally:
        for name in (f"{keep}:env", built):
            with contextlib.suppress(APIError):
                engine.client.images.remove(name, force=True)


async def bob_is_refused(
    client, engine: Engine, bob: dict[str, str], built: str, snapshot_image: str
) -> None:
    """Every way of naming alice's two images fails bob's tasks with the refusal."""
    names = []
    for image in (built, snapshot_image):
        image_id = engine.client.api.inspect_image(image)["Id"].removeprefix("sha256:")
        names += [image, f"sha256:{image_id}", image_id[:12]]
    tasks = "".join(
        f"""
[[stages.tasks]]
name = "t{index}"
command = ["cat", "/opt/labgate-env/labgate_alices_pkg.py"]
environment = {{image = "{name}"}}
where = {{site = "box"}}
[[stages.tasks]]
name = "p{index}"
command = ["true"]
environment = {{image = "{name}", python = ["six==1.16.0"]}}
where = {{site = "box"}}
"""
        for index, name in enumerate(names)
    )
    theirs = f'name = "theirs"\n[[stages]]\nname = "one"\ncontinue_on_failure = true\n{tasks}'
    run = await wait_run(client, bob, await submit(client, bob, theirs), timeout=180)
    for name, task in tasks_of(run).items():
        assert task["state"] == "failed", (name, task)
        assert "labgate's own" in task["reason"] or "may not run one" in task["reason"], task
    logs = await client.get(f"/api/v1/runs/{run['id']}/logs", params={"task": "t0"}, headers=bob)
    assert "alice only" not in logs.text


async def test_a_task_container_is_stopped_on_cancel_and_past_its_timeout(
    client, make_user, engine, deployment
):
    alice = await make_user("alice")
    definition = f"""
name = "long"
[[stages]]
name = "one"
continue_on_failure = true
[[stages.tasks]]
name = "slow"
command = ["sleep", "300"]
timeout = 2
environment = {{image = "{BUSYBOX_IMAGE}"}}
[[stages.tasks]]
name = "hang"
command = ["sleep", "300"]
environment = {{image = "{BUSYBOX_IMAGE}"}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, ("running",), timeout=60)
    for _ in range(600):
        run = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
        if tasks_of(run)["slow"]["state"] == "failed":
            break
        await asyncio.sleep(0.1)
    assert tasks_of(run)["slow"]["reason"] == "timed out after 2.0s"
    assert tasks_of(run)["hang"]["state"] == "running"
    answer = await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)
    assert answer.status_code in (200, 202), answer.text
    run = await wait_run(client, alice, run_id, timeout=30)
    assert run["state"] == "cancelled"
    for _ in range(100):
        if not running_tasks(engine, deployment):
            break
        await asyncio.sleep(0.1)
    assert running_tasks(engine, deployment) == []


async def test_an_image_task_is_never_placed_on_a_process_site(client, make_user):
    alice = await make_user("alice")
    definition = f"""
name = "nowhere"
[[stages]]
name = "one"
[[stages.tasks]]
name = "boxed"
command = ["true"]
environment = {{image = "{BUSYBOX_IMAGE}"}}
where = {{site = "alpha"}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=30)
    assert run["state"] == "failed"
    assert tasks_of(run)["boxed"]["state"] == "lost"
    assert "no live site matches" in tasks_of(run)["boxed"]["reason"]


NOTE_SCRIPT = """
import json, os, urllib.request
url = f"{os.environ['LABGATE_API_URL']}/tasks/{os.environ['LABGATE_ATTEMPT_ID']}/events"
body = json.dumps({"message": "half way", "data": {"done": 0.5}}).encode()
request = urllib.request.Request(url, data=body, method="POST", headers={
    "Authorization": f"Bearer {os.environ['LABGATE_TASK_TOKEN']}",
    "Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=10).status, url)
"""


async def test_a_task_in_a_container_sends_notes_with_its_own_token(
    app, client, make_user, settings
):
    # The portal as the test serves it (settings name port 8000): loopback, as by default,
    # so the container reaches it through the relay on the engine's gateway.
    app.state.portal.run_processor.api_url = f"{app.state.test_url}/api/v1"
    alice = await make_user("alice")
    definition = f"""
name = "notes"
[[stages]]
name = "one"
[[stages.tasks]]
name = "talker"
command = ["python3", "-c", {json.dumps(NOTE_SCRIPT)}]
environment = {{image = "{PYTHON_IMAGE}"}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=90)
    assert run["state"] == "succeeded", run
    notes = [e for e in run["events"] if e["state"] == "note"]
    assert len(notes) == 1 and notes[0]["task"] == "talker", run["events"]
    assert notes[0]["message"].endswith("half way") and notes[0]["data"] == {"done": 0.5}
    logs = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "talker"}, headers=alice)
    status, url = logs.json()["text"].split()
    assert status == "204" and "127.0.0.1" not in url  # the relay, not the container itself

    # The token is good for its own attempt only, and only while it runs.
    attempt = await run_attempt(app, run_id)
    token = task_token(settings.secret_key.get_secret_value(), attempt)
    ended = await client.post(
        f"/api/v1/tasks/{attempt}/events",
        json={"message": "late"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert ended.status_code == 409, ended.text
    other = await client.post(
        "/api/v1/tasks/0123456789abcdef0123456789abcdef/events",
        json={"message": "not mine"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert other.status_code == 401
    user = await client.post(
        f"/api/v1/tasks/{attempt}/events",
        json={"message": "a person"},
        headers=alice,
    )
    assert user.status_code == 401


async def run_attempt(app, run_id: str) -> str:
    """The id of the (only) attempt of a run."""
    from sqlalchemy import select

    from labgate.db.runs import RunTask, TaskAttempt

    def find(session):
        return session.scalar(
            select(TaskAttempt.id)
            .join(RunTask, RunTask.id == TaskAttempt.task_id)
            .where(RunTask.run_id == run_id)
        )

    return await app.state.portal.run_db(find)


async def test_an_environment_that_cannot_be_prepared_fails_the_task_with_the_reason(
    client, make_user, tmp_path: Path
):
    alice = await make_user("alice")
    definition = f"""
name = "broken"
[[stages]]
name = "one"
continue_on_failure = true
[[stages.tasks]]
name = "missing"
command = ["true"]
environment = {{python = ["{tmp_path}/no-such-1.0-py3-none-any.whl"], image = "{PYTHON_IMAGE}"}}
[[stages.tasks]]
name = "baseless"
command = ["true"]
environment = {{python = ["{tmp_path}/no-such-1.0-py3-none-any.whl"]}}
where = {{site = "box"}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=120)
    tasks = tasks_of(run)
    assert tasks["missing"]["state"] == "failed"
    assert "preparing the Python environment failed" in tasks["missing"]["reason"]
    assert tasks["baseless"]["state"] == "failed"
    assert "no base image for Python requirements" in tasks["baseless"]["reason"]
    assert "task_image" in tasks["baseless"]["reason"]


async def test_a_new_executor_finds_a_task_container_again_and_its_outcome(
    settings, engine, deployment, tmp_path: Path
):
    """What an agent restart does: the attempt's directory and container are all it needs."""
    from labgate.wire.runs import TaskSpec

    def executor() -> Any:
        return container_executor(settings, engine, deployment)

    spec = TaskSpec(
        attempt_id="ab" * 16,
        run_id="r",
        task="again",
        owner="alice",
        # It runs until the test lets it end: a loaded machine cannot outrun it.
        command=(
            "until [ -e $LABGATE_RESULTS_DIR/go ]; do sleep 0.1; done; "
            "echo 7 > $LABGATE_RESULT; echo out > $LABGATE_RESULTS_DIR/f"
        ),
        image=BUSYBOX_IMAGE,
    )
    directory = tmp_path / spec.attempt_id
    directory.mkdir()
    await executor().start(spec, directory)
    successor = executor()  # the first one is gone, as after a restart
    assert await successor.poll(directory) is None  # still running
    (directory / "results" / "go").touch()
    for _ in range(100):
        outcome = await successor.poll(directory)
        if outcome is not None:
            break
        await asyncio.sleep(0.1)
    assert outcome is not None
    assert (outcome.state, outcome.exit_code, outcome.result) == ("succeeded", 0, 7)
    assert (directory / "results" / "f").read_text() == "out\n"
    assert task_containers(engine, deployment) == []
    # Asked again (a report lost on the way), it answers the same from the directory.
    assert await executor().poll(directory) == outcome


def container_executor(settings: Settings, engine: Engine, deployment: str) -> Any:
    """A task executor of site ``box`` on the run's Podman, as an agent makes one."""
    from labgate.agent.taskcontainer import ContainerTaskExecutor
    from labgate.agent.tasks import ProcessTaskExecutor
    from labgate.backends.containers import ContainerBackend

    backend = ContainerBackend(settings, {"base_url": engine.base_url, "deployment": deployment})
    backend.attach("box")
    return ContainerTaskExecutor(backend, ProcessTaskExecutor(site_name="box"))


async def test_a_task_podman_trips_over_as_it_exits_ends_with_its_code(
    settings, engine, deployment, tmp_path: Path
):
    """Podman 4.3 fails a start and an inspect as the process exits (podman#16383): no matter."""
    from labgate.wire.runs import TaskSpec

    executor = container_executor(settings, engine, deployment)
    spec = TaskSpec(
        attempt_id="cd" * 16,
        run_id="r",
        task="quick",
        owner="alice",
        command="echo done > $LABGATE_RESULTS_DIR/f; exit 3",
        image=BUSYBOX_IMAGE,
    )
    directory = tmp_path / spec.attempt_id
    directory.mkdir()
    with podman.exit_race(executor.backend.client.api) as race:
        await executor.start(spec, directory)
        for _ in range(100):
            outcome = await executor.poll(directory)
            if outcome is not None:
                break
            await asyncio.sleep(0.1)
    assert len(race.started) == 1 and race.tripped
    assert outcome is not None
    assert (outcome.state, outcome.exit_code) == ("failed", 3)
    assert (directory / "results" / "f").read_text() == "done\n"
    assert task_containers(engine, deployment) == []
