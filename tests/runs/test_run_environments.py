"""Task environments: a venv with the task's Python requirements, made once per distinct list."""

from __future__ import annotations

from runs_helpers import make_wheel, submit, tasks_of, wait_run


async def test_a_callable_from_the_tasks_requirements_runs_in_a_venv_made_once(
    client, make_user, shelf, settings
):
    alice = await make_user("alice")
    source = "def answer(x):\n    return {'twice': 2 * x}\n"
    wheel = make_wheel(shelf, "labgate_demo_pkg", source)
    definition = f"""
name = "envs"
[[stages]]
name = "one"
[[stages.tasks]]
name = "first"
callable = "labgate_demo_pkg:answer"
args = {{x = 21}}
environment = {{python = ["{wheel}"]}}
where = {{site = "alpha"}}
[[stages.tasks]]
name = "second"
command = ["python", "-c", "import labgate_demo_pkg, sys; print(sys.prefix)"]
environment = {{python = ["{wheel}"]}}
where = {{site = "alpha"}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=180)
    assert run["state"] == "succeeded", run
    tasks = tasks_of(run)
    assert tasks["first"]["result"] == {"twice": 42}
    envs = list((settings.data_dir / "envs" / "alpha").iterdir())
    assert len(envs) == 1  # one list, one venv, shared by both tasks
    logs = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "second"}, headers=alice)
    assert logs.json()["text"].strip() == str(envs[0].resolve())
    notes = [e["message"] for e in run["events"] if e["state"] == "preparing"]
    assert any("preparing a Python environment" in n for n in notes)
    assert sum("ready in" in n for n in notes) == 1  # prepared once

    # Another run with the same list reuses it: no preparation at all.
    again = await submit(client, alice, definition.replace('name = "envs"', 'name = "again"'))
    run = await wait_run(client, alice, again, timeout=60)
    assert run["state"] == "succeeded"
    assert not [e for e in run["events"] if e["state"] == "preparing"]
