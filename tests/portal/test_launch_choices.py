"""A launch's options checked against its site's choices at once (no cluster needed).

The Slurm site here is a network site whose agent never connects: what a user
may choose comes from its options alone, and a refused choice is a 422 naming
it before any instance exists.
"""

from __future__ import annotations

import pytest

CHOICES = {"partition": ["interactive", "batch"], "time": ["0:10:00", "1:00:00"]}
HPC = {
    "name": "hpc",
    "backend": "slurm",
    "options": {"partition": "interactive", "choices": CHOICES},
}


@pytest.fixture
async def hpc(client, admin_headers) -> None:
    """The Slurm network site ``hpc`` with launch choices, beside the local process site."""
    r = await client.post("/api/v1/sites", json=HPC, headers=admin_headers)
    assert r.status_code == 201, r.text


async def test_sites_show_their_choices(client, make_user, hpc):
    alice = await make_user("alice")
    sites = {s["name"]: s for s in (await client.get("/api/v1/sites", headers=alice)).json()}
    assert sites["local"]["choices"] == {}
    partition = sites["hpc"]["choices"]["partition"]
    assert partition == {"default": "interactive", "allowed": ["interactive", "batch"]}
    assert sites["hpc"]["choices"]["time"]["allowed"] == CHOICES["time"]


@pytest.mark.parametrize(
    ("site", "options", "option", "words"),
    [
        ("hpc", {"partition": "gpu"}, "partition", "'gpu' is not allowed on site hpc"),
        ("hpc", {"time": "9:00:00"}, "time", "allowed: 0:10:00, 1:00:00"),
        ("hpc", {"qos": "high"}, "qos", "qos cannot be chosen on site hpc"),
        ("local", {"partition": "batch"}, "partition", "choose: nothing"),
    ],
)
async def test_a_choice_the_site_does_not_offer_is_refused_naming_it(
    client, make_user, hpc, site, options, option, words
):
    alice = await make_user("alice")
    body = {"tool": "demo", "site": site, "options": options}
    r = await client.post("/api/v1/instances", json=body, headers=alice)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_option" and r.json()["option"] == option
    assert words in r.json()["detail"]
    listed = await client.get("/api/v1/instances", headers=alice)
    assert listed.json() == []
