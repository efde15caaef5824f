"""A run end to end on real processes: stages in order, parallel tasks, results back."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time

from runs_helpers import submit, tasks_of, wait_run

from labgate.scheduler import runs

PIPELINE = """
name = "three"

[[stages]]
name = "prepare"
[[stages.tasks]]
name = "make"
command = "echo prepared > $LABGATE_RESULTS_DIR/data.txt; echo '{\\"n\\": 3}' > $LABGATE_RESULT"
where = {site = "alpha"}

[[stages]]
name = "fan"
[[stages.tasks]]
name = "everywhere"
command = ["python3", "-c", "import os; print('on', os.environ['LABGATE_TASK'])"]
where = {every = true}
[[stages.tasks]]
name = "twice"
command = "sleep 0.3; echo copy $LABGATE_TASK_COPY > $LABGATE_RESULTS_DIR/copy.txt"
where = {labels = {tier = "b"}, copies = 2}

[[stages]]
name = "finish"
[[stages.tasks]]
name = "sum"
callable = "json:dumps"
args = {obj = [1, 2]}
"""


async def test_three_stages_across_two_sites_with_results(client, make_user):
    alice = await make_user("alice")
    run_id = await submit(client, alice, PIPELINE)
    run = await wait_run(client, alice, run_id)
    assert run["state"] == "succeeded", run
    assert [s["state"] for s in run["stages"]] == ["succeeded"] * 3
    tasks = tasks_of(run)
    assert set(tasks) == {"make", "everywhere", "everywhere#1", "twice", "twice#1", "sum"}
    assert tasks["make"]["site"] == "alpha"
    assert tasks["make"]["result"] == {"n": 3}
    assert tasks["make"]["files"] == ["data.txt"]
    assert {tasks["everywhere"]["site"], tasks["everywhere#1"]["site"]} == {"alpha", "beta"}
    assert tasks["twice"]["site"] == tasks["twice#1"]["site"] == "beta"
    assert tasks["sum"]["result"] == "[1, 2]"
    assert all(t["exit_code"] == 0 for t in tasks.values())
    # Stages in order: every task of a stage started after the one before ended.
    events = run["events"]
    order = [e["message"] for e in events if e["task"] == "" and "stage" in e["message"]]
    assert order == [
        "stage prepare started",
        "stage prepare succeeded",
        "stage fan started",
        "stage fan succeeded",
        "stage finish started",
        "stage finish succeeded",
    ]

    logs = await client.get(
        f"/api/v1/runs/{run_id}/logs", params={"task": "everywhere"}, headers=alice
    )
    assert logs.status_code == 200, logs.text
    assert "on everywhere" in logs.json()["text"]

    archive = await client.get(f"/api/v1/runs/{run_id}/results", headers=alice)
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        names = set(tar.getnames())
        assert {"results.json", "make/data.txt", "twice/copy.txt", "twice#1/copy.txt"} <= names
        extracted = tar.extractfile("make/data.txt")
        assert extracted is not None and extracted.read() == b"prepared\n"
        summary = tar.extractfile("results.json")
        assert summary is not None
        assert tasks_of(json.loads(summary.read()))["make"]["result"] == {"n": 3}
        copies = {tar.extractfile(f"{n}/copy.txt").read() for n in ("twice", "twice#1")}  # type: ignore[union-attr]
        assert copies == {b"copy 0\n", b"copy 1\n"}


async def test_a_wide_stage_runs_at_most_the_sites_share_at_once(client, make_user, app):
    app.state.portal.run_processor.tasks_per_site = 2
    alice = await make_user("alice")
    definition = """
[[stages]]
name = "wide"
[[stages.tasks]]
name = "many"
command = "sleep 0.2"
where = {site = "alpha", copies = 6}
"""
    run_id = await submit(client, alice, definition)
    most = 0
    while True:
        run = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
        running = [t for t in run["stages"][0]["tasks"] if t["state"] == "running"]
        most = max(most, len(running))
        if run["state"] != "running":
            break
    assert run["state"] == "succeeded"
    assert most == 2


async def test_copies_behind_a_full_sites_ones_start_on_a_site_with_room(
    client, make_user, app, monkeypatch
):
    """An advance reads pending copies a page at a time: past a page for a full site."""
    monkeypatch.setattr(runs, "PLACING_PAGE", 4)
    app.state.portal.run_processor.tasks_per_site = 2
    alice = await make_user("alice")
    definition = """
[[stages]]
name = "wide"
[[stages.tasks]]
name = "here"
command = "sleep 30"
where = {site = "alpha", copies = 9}
[[stages.tasks]]
name = "there"
command = "sleep 30"
where = {site = "beta", copies = 2}
"""
    run_id = await submit(client, alice, definition)
    deadline = time.monotonic() + 30
    while True:
        run = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
        running = [t for t in run["stages"][0]["tasks"] if t["state"] == "running"]
        there = [t for t in running if t["task"] == "there"]
        if len(there) == 2:
            break
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.1)
    assert {t["site"] for t in there} == {"beta"}
    assert len([t for t in running if t["task"] == "here"]) == 2
    cancelled = await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)
    assert cancelled.status_code == 200, cancelled.text
    await wait_run(client, alice, run_id, ("cancelled",))


async def test_a_runs_events_are_followed_after_an_id(client, make_user):
    """``GET /runs/{id}/events?after=``: only the newer events, with the run's state."""
    alice = await make_user("alice")
    run_id = await submit(client, alice, PIPELINE)
    run = await wait_run(client, alice, run_id)
    everything = [e["id"] for e in run["events"]]
    assert everything == sorted(everything) and len(everything) > 4

    async def events(**params: int) -> dict:
        answer = await client.get(f"/api/v1/runs/{run_id}/events", params=params, headers=alice)
        assert answer.status_code == 200, answer.text
        return answer.json()

    followed = await events()
    assert followed["state"] == "succeeded"
    assert followed["events"] == run["events"]
    assert [e["id"] for e in (await events(after=everything[1]))["events"]] == everything[2:]
    assert [e["id"] for e in (await events(after=everything[0], limit=2))["events"]] == (
        everything[1:3]
    )
    assert (await events(after=everything[-1]))["events"] == []
    for bad in ({"after": -1}, {"after": 2**80}, {"limit": 0}):
        answer = await client.get(f"/api/v1/runs/{run_id}/events", params=bad, headers=alice)
        assert answer.status_code == 422, (bad, answer.text)


async def test_a_runs_view_holds_a_page_of_its_events_and_says_when_there_are_more(
    client, make_user, monkeypatch
):
    """A run whose tasks added many events (notes, retries) was shown whole in one answer:
    the view holds the first page, oldest first, and says there is more."""
    from labgate.portal.api import runs as runs_api

    alice = await make_user("alice")
    run_id = await submit(client, alice, PIPELINE)
    run = await wait_run(client, alice, run_id)
    everything = [e["id"] for e in run["events"]]
    assert run["events_more"] is False and len(everything) > 3
    monkeypatch.setattr(runs_api, "MAX_EVENTS", 3)
    shown = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
    assert [e["id"] for e in shown["events"]] == everything[:3]
    assert shown["events_more"] is True
    rest = await client.get(
        f"/api/v1/runs/{run_id}/events", params={"after": everything[2]}, headers=alice
    )
    assert [e["id"] for e in rest.json()["events"]] == everything[3:]
    assert (
        "events"
        not in (await client.get(f"/api/v1/runs/{run_id}?events=false", headers=alice)).json()
    )
