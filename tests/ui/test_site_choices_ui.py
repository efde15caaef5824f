"""The launch form's site and its Slurm choices, in Chromium, on the real one-node cluster.

A labgate with two sites, the local process site and a Slurm site whose
partition and wall time users may choose: the demo card offers both sites; the
Slurm site's choices appear when it is picked; a value the site does not offer
(the page changed under the user) is refused in the form, naming the field;
the chosen partition and time reach the job. The Slurm site's relay listens on
this machine's outward address, as a compute node's would, so the tool opens
through the router while listening on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from servers import LabgateServer
from slurm_cluster import Cluster, outward_address
from ui.support import ADMIN_PASSWORD, INSTANCE_PAGE, Gateway, open_gateway, stop_all_instances

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHOICES = {"partition": ["interactive", "batch"], "time": ["0:30:00", "2:00:00"]}


@pytest.fixture(scope="module")
def slurm_server(
    tmp_path_factory: pytest.TempPathFactory, slurm_cluster: Cluster
) -> Iterator[tuple[LabgateServer, Path, str]]:
    """``labgate serve`` with a process site and a Slurm site; its job files and relay address."""
    address = outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address (no default route)")
    base = tmp_path_factory.mktemp("slurm-ui")
    jobs = base / "jobs"
    # About the form: the job may run as the agent's account (the users have none here).
    options = slurm_cluster.options(
        endpoint_host=address,
        request_memory=False,
        jobs_dir=str(jobs),
        choices=CHOICES,
        run_as="agent",
    )
    sites = [{"name": "here"}, {"name": "hpc", "backend": "slurm", "options": options}]
    server = LabgateServer(base / "var", ADMIN_PASSWORD, LABGATE_SITES=json.dumps(sites))
    server.start()
    try:
        yield server, jobs, address
    finally:
        stop_all_instances(server)
        server.stop()
        slurm_cluster.cancel_all()


@pytest.fixture
def slurm_gateway(
    playwright_browser: Any, slurm_server: tuple[LabgateServer, Path, str]
) -> Iterator[Gateway]:
    """The Slurm labgate and the module's browser; page errors fail the test."""
    with open_gateway(slurm_server[0], playwright_browser) as gw:
        yield gw


def test_the_launch_form_offers_the_slurm_sites_choices_and_refuses_others(
    slurm_gateway: Gateway, slurm_server: tuple[LabgateServer, Path, str], slurm_cluster: Cluster
) -> None:
    gateway, (_, jobs, address) = slurm_gateway, slurm_server
    name = gateway.create_user("hana")
    page = gateway.page()
    gateway.sign_in(page, name)
    card = page.locator('li.card[data-tool="demo"]')
    site = card.get_by_label("Site")
    expect(site.locator("option")).to_have_text(["Any site", "here", "hpc"])
    expect(card.get_by_label("Partition")).to_be_hidden()
    site.select_option("hpc")
    partition, time_limit = card.get_by_label("Partition"), card.get_by_label("Time")
    expect(partition.locator("option")).to_have_text(["Site default", "interactive", "batch"])
    expect(time_limit.locator("option")).to_have_text(["Site default (8:00:00)", *CHOICES["time"]])

    partition.select_option("batch")
    time_limit.select_option("2:00:00")
    card.scroll_into_view_if_needed()
    gateway.shot(page, "tools-launch-form-site-choices", docs=True)

    # The site's choices changed since the page was drawn: the API refuses, the form says so.
    partition.evaluate("select => select.add(new Option('gpu', 'gpu', true, true))")
    card.get_by_role("button", name="Launch").click()
    expect(card.locator(".form-error")).to_contain_text("'gpu' is not allowed on site hpc")
    expect(partition).to_have_attribute("aria-invalid", "true")
    gateway.shot(page, "tools-launch-form-site-choices-refused")

    partition.select_option("batch")
    card.get_by_role("button", name="Launch").click()
    page.wait_for_url(INSTANCE_PAGE)
    instance_id = INSTANCE_PAGE.search(page.url).group(1)  # type: ignore[union-attr]
    # Open through the router, which reaches the job by the relay on the node's address.
    page.wait_for_url(re.compile(rf"/i/{instance_id}/$"), timeout=60_000)
    jobs_of = slurm_cluster.run("squeue", "-h", "-o", "%j|%P|%l").split()
    assert f"labgate-hpc-{instance_id}|batch|2:00:00" in jobs_of, jobs_of
    endpoint = json.loads((jobs / instance_id / "endpoint.json").read_text())
    assert endpoint["host"] == address
    # The tool itself is not on the node's address: only its relay is.
    with pytest.raises(OSError):
        socket.create_connection((address, endpoint["tool_port"]), timeout=2).close()
    with httpx.Client(base_url=gateway.url, headers=gateway.token(name), timeout=10) as client:
        client.delete(f"/api/v1/instances/{instance_id}")
