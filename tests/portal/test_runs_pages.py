"""The runs pages: the list, and a run's graph of stages and tasks, for its owner only."""

from __future__ import annotations

import asyncio

from test_pages import HTML, check_page, sign_in

DEFINITION = """
name = "shown"
[[stages]]
name = "first"
[[stages.tasks]]
name = "alpha-task"
command = "echo 1 > $LABGATE_RESULT"
[[stages]]
name = "second"
[[stages.tasks]]
name = "par"
command = "true"
where = {copies = 2}
"""


async def test_the_run_page_shows_the_graph_to_its_owner_only(client, make_user):
    ann = await make_user("ann")
    await make_user("ben")
    created = await client.post("/api/v1/runs", content=DEFINITION, headers=ann)
    run_id = created.json()["id"]
    for _ in range(300):
        if (await client.get(f"/api/v1/runs/{run_id}", headers=ann)).json()["state"] != "running":
            break
        await asyncio.sleep(0.05)
    await sign_in(client, "ann")
    listing = await client.get("/runs", headers=HTML)
    assert listing.status_code == 200
    check_page(listing)
    assert f'href="/runs/{run_id}"' in listing.text
    page = await client.get(f"/runs/{run_id}", headers=HTML)
    assert page.status_code == 200
    parsed = check_page(page)
    assert "nav" in parsed.landmarks
    text = page.text
    # Stages in order, each with its tasks and their state.
    assert text.index(">first <") < text.index(">second <")
    for name in ("alpha-task", "par", "par#1"):
        assert f'data-task="{name}" data-state="succeeded"' in text
    assert "on local" in text and '<code class="result">1</code>' in text
    assert f'href="/api/v1/runs/{run_id}/results"' in text

    client.cookies.clear()
    await sign_in(client, "ben")
    other = await client.get(f"/runs/{run_id}", headers=HTML)
    assert other.status_code == 404
    assert run_id not in (await client.get("/runs", headers=HTML)).text
