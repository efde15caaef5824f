"""The slurm backend on a real one-node Slurm cluster (munge, slurmctld, slurmd; see slurm_cluster).

Through the portal and the router: the demo tool answers on the node, the
queue shows when the node is full, a queued launch is cancelled, a job
cancelled outside labgate ends ``lost`` with the reason, the wall time ends
the instance (and is its countdown), and the job's core-hours are recorded.
Jobs run as their owners' test accounts (``lgslurm-alice``); a user with no
account cannot launch.
"""

from __future__ import annotations

import asyncio
import pwd
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import wait_for_state
from labgate.config import Settings, SiteConfig
from slurm_cluster import Cluster

pytestmark = pytest.mark.slow

SITE = "hpc"


@pytest.fixture
def settings(settings: Settings, slurm_dir: Path, slurm: Cluster) -> Settings:
    """The test's settings (conftest) with one Slurm site on the test cluster.

    Its jobs run as their owners' test accounts (alice's is ``lgslurm-alice``).
    """
    options = slurm.options(
        endpoint_host="127.0.0.1",
        request_memory=False,
        jobs_dir=str(slurm_dir / "jobs"),
        workspaces_dir=str(slurm_dir / "workspaces"),
        choices={"partition": ["interactive", "batch"], "time": ["0:01:00", "1:00:00"]},
    )
    site = SiteConfig(name=SITE, backend="slurm", options=options)
    return settings.model_copy(update={"cull_interval": 0.5, "sites": [site]})


async def launch(
    client: httpx.AsyncClient, headers: dict[str, str], tool: str = "demo", **body: Any
) -> str:
    """Launch ``tool``; its instance id."""
    r = await client.post("/api/v1/instances", json={"tool": tool, **body}, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def events(app: Any, instance_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The instance's events: (kind, message, data), oldest first."""
    from sqlalchemy import select

    from labgate.db.models import InstanceEvent

    def read(session: Any) -> list[tuple[str, str, dict[str, Any]]]:
        rows = session.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id == instance_id)
            .order_by(InstanceEvent.id)
        )
        return [(row.kind, row.message, dict(row.data or {})) for row in rows]

    result: list[tuple[str, str, dict[str, Any]]] = await app.state.portal.run_db(read)
    return result


async def backend_state(app: Any, instance_id: str) -> dict[str, Any]:
    """The instance's saved backend state."""
    from labgate.db.models import Instance

    state: dict[str, Any] = await app.state.portal.run_db(
        lambda s: dict(s.get(Instance, instance_id).backend_state)
    )
    return state


async def wait_event(app: Any, instance_id: str, words: str, timeout: float = 30) -> str:
    """Wait for an event whose message contains ``words``; that message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, message, _ in await events(app, instance_id):
            if words in message:
                return message
        await asyncio.sleep(0.1)
    raise AssertionError(f"no event with {words!r}: {await events(app, instance_id)}")


def job_ids(slurm: Cluster) -> set[str]:
    """The jobs the controller still runs or queues."""
    return set(slurm.run("squeue", "-h", "-o", "%i").split())


async def test_demo_through_the_router_and_its_usage(app, client, make_user, router_url, slurm):
    alice = await make_user("alice")
    iid = await launch(client, alice)
    body = await wait_for_state(client, alice, iid, {"running", "failed"}, timeout=60)
    assert body["state"] == "running", (body["reason"], await events(app, iid))
    await wait_event(app, iid, f"running on node {slurm.node}")
    state = await backend_state(app, iid)
    assert state["job_id"] in job_ids(slurm)
    # The cluster's default partition; the job's name says whose it is (reconcile reads it).
    assert slurm.run("squeue", "-h", "-j", state["job_id"], "-o", "%P|%j").strip() == (
        f"interactive|labgate-{SITE}-{iid}"
    )
    async with httpx.AsyncClient(base_url=router_url, headers=alice, timeout=10) as browser:
        r = await browser.get(f"/i/{iid}/api/health")
        assert r.status_code == 200, r.text
    assert (await client.delete(f"/api/v1/instances/{iid}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, iid, {"stopped"}, timeout=30)
    assert state["job_id"] not in job_ids(slurm)
    usage = [data["usage"] for _, _, data in await events(app, iid) if "usage" in data]
    assert usage and usage[0]["job_id"] == state["job_id"], await events(app, iid)
    assert usage[0]["cpus"] == 1 and usage[0]["core_hours"] >= 0
    # sacct when the cluster keeps accounting and has the record already, else the controller's.
    assert usage[0]["source"] in ("sacct", "scontrol")


async def test_queue_shows_and_a_queued_launch_is_cancelled(app, client, make_user, slurm):
    alice = await make_user("alice")
    # The node has two CPUs: two instances of one CPU fill it, the third waits.
    first = [await launch(client, alice, resources={"cpu": 1}) for _ in range(2)]
    for iid in first:
        assert (await wait_for_state(client, alice, iid, {"running", "failed"}))["state"] == (
            "running"
        )
    queued = await launch(client, alice, resources={"cpu": 1})
    note = await wait_event(app, queued, "queued (")
    assert "position 1 of 1" in note, note
    assert (await client.get(f"/api/v1/instances/{queued}", headers=alice)).json()["state"] == (
        "starting"
    )
    job = (await backend_state(app, queued))["job_id"]
    assert job in job_ids(slurm)
    # Cancelled while queued: the job leaves the queue, the instance is stopped.
    assert (await client.delete(f"/api/v1/instances/{queued}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, queued, {"stopped"}, timeout=30)
    assert job not in job_ids(slurm)
    for iid in first:
        await client.delete(f"/api/v1/instances/{iid}", headers=alice)
    for iid in first:
        await wait_for_state(client, alice, iid, {"stopped"}, timeout=30)


async def test_job_cancelled_outside_labgate_is_lost_with_the_reason(app, client, make_user, slurm):
    alice = await make_user("alice")
    iid = await launch(client, alice)
    started = await wait_for_state(client, alice, iid, {"running", "failed"})
    assert started["state"] == "running", started
    job = (await backend_state(app, iid))["job_id"]
    slurm.run("scancel", job)
    body = await wait_for_state(client, alice, iid, {"lost"}, timeout=30)
    assert f"Slurm job {job} cancelled outside labgate" in body["reason"], body


async def test_a_choice_among_allowed_values_and_a_refused_one(app, client, make_user, slurm):
    alice = await make_user("alice")
    # Users see what they may choose with the site.
    [site] = (await client.get("/api/v1/sites", headers=alice)).json()
    assert site["choices"]["partition"] == {"default": "", "allowed": ["interactive", "batch"]}
    assert site["choices"]["time"]["allowed"] == ["0:01:00", "1:00:00"]
    iid = await launch(client, alice, options={"partition": "batch", "time": "1:00:00"})
    started = await wait_for_state(client, alice, iid, {"running", "failed"})
    assert started["state"] == "running", started
    job = (await backend_state(app, iid))["job_id"]
    assert slurm.run("squeue", "-h", "-j", job, "-o", "%P|%l").strip() == "batch|1:00:00"
    refused = await launch(client, alice, options={"partition": "gpu"})
    body = await wait_for_state(client, alice, refused, {"failed"})
    assert "partition 'gpu' is not allowed here" in body["reason"], body


async def test_the_wall_time_is_the_lifetime_stop(app, client, make_user, slurm):
    alice = await make_user("alice")
    iid = await launch(client, alice, options={"time": "0:01:00"})
    started = await wait_for_state(client, alice, iid, {"running", "failed"})
    assert started["state"] == "running", started
    state = await backend_state(app, iid)
    body = (await client.get(f"/api/v1/instances/{iid}/keep-alive", headers=alice)).json()
    # The countdown the UI shows is the job's end.
    assert body["cull_reason"] == "lifetime", body
    assert 0 < body["cull_in"] <= 60
    assert abs(state["ends_at"] - state["started_at"] - 60) < 2
    body = await wait_for_state(client, alice, iid, {"stopped", "lost"}, timeout=90)
    assert "wall time" in body["reason"] or "wall time" in str(await events(app, iid))
    assert state["job_id"] not in job_ids(slurm)


@pytest.mark.e2e
async def test_jupyterlab_on_a_node_runs_code_through_the_router(
    app, client, make_user, router_url, slurm
):
    pytest.importorskip(
        "jupyterlab", reason="install the jupyter extra: pip install -e '.[jupyter]'"
    )
    from jupyter_client_util import execute

    alice = await make_user("alice")
    iid = await launch(client, alice, tool="jupyterlab", resources={"cpu": 1})
    body = await wait_for_state(client, alice, iid, {"running", "failed"}, timeout=120)
    assert body["state"] == "running", (body["reason"], await events(app, iid))
    # Through the router, as a browser would: the router adds the instance token.
    base = f"{router_url}/i/{iid}/"
    assert await execute(base, base.replace("http://", "ws://"), alice, "6*7") == "42"
    job = (await backend_state(app, iid))["job_id"]
    assert (await client.delete(f"/api/v1/instances/{iid}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, iid, {"stopped"}, timeout=60)
    assert job not in job_ids(slurm)


async def test_the_instance_token_is_only_in_the_jobs_private_file(app, client, make_user, slurm):
    alice = await make_user("alice")
    iid = await launch(client, alice)
    started = await wait_for_state(client, alice, iid, {"running", "failed"})
    assert started["state"] == "running", started
    state = await backend_state(app, iid)

    def secret(session: Any) -> str:
        from labgate.db.models import Instance

        instance = session.get(Instance, iid)
        return str(app.state.portal.box.open(iid, instance.secret))

    token = await app.state.portal.run_db(secret)
    job_dir = Path(state["dir"])
    # Not in the batch script, Slurm's record of the job, or any process's command line.
    assert token not in (job_dir / "job.py").read_text()
    assert token not in slurm.run("scontrol", "show", "job", "-d", state["job_id"])
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert token.encode() not in cmdline.read_bytes()
        except OSError:
            continue
    # Only in launch.json, readable by the job's own account alone, in a directory of its own.
    assert token in (job_dir / "launch.json").read_text()
    alice = pwd.getpwnam("lgslurm-alice").pw_uid
    launch_json, info = (job_dir / "launch.json").stat(), job_dir.stat()
    assert (launch_json.st_uid, launch_json.st_mode & 0o777) == (alice, 0o600)
    assert (info.st_uid, info.st_mode & 0o777) == (alice, 0o700)


async def test_a_job_whose_tool_fails_says_why_with_its_last_lines(app, client, make_user, slurm):
    alice = await make_user("alice")
    iid = await launch(client, alice, tool="crashing")
    body = await wait_for_state(client, alice, iid, {"failed", "running"})
    assert body["state"] == "failed", body
    assert "Slurm job" in body["reason"] and "exit code" in body["reason"], body
    tails = [data.get("log_tail", "") for _, _, data in await events(app, iid)]
    assert any("--- labgate: starting" in tail for tail in tails), tails


async def test_a_tool_with_launch_parameters_runs_on_a_node(app, client, make_user, slurm):
    """``{param_...}`` in a tool's command or environment is filled in on Slurm too."""
    alice = await make_user("alice")
    iid = await launch(client, alice, tool="form", params={"size": "1920x1080"})
    body = await wait_for_state(client, alice, iid, {"running", "failed"}, timeout=60)
    assert body["state"] == "running", (body["reason"], await events(app, iid))
    assert (await client.delete(f"/api/v1/instances/{iid}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, iid, {"stopped"}, timeout=30)


async def test_a_launch_by_a_user_without_an_account_fails_with_the_reason(
    app, client, make_user, slurm
):
    dave = await make_user("dave")  # not in the site's accounts, and no Unix account of the name
    iid = await launch(client, dave)
    body = await wait_for_state(client, dave, iid, {"failed", "running"})
    assert body["state"] == "failed", body
    assert "labgate user 'dave' has no Unix account 'dave' on the cluster" in body["reason"]
    assert "site option accounts" in body["reason"]
    assert slurm.run("squeue", "-h", "-o", "%i").split() == []
