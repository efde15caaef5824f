"""A rolling restart of the split deployment (deploy/) during use loses nothing.

Two portals, two routers and an agent, run from the units. A user keeps a
WebSocket to an instance open through router A and makes requests in a loop
(to the API and to the tool), spreading them over both routers and trying the
other router on a connection error, as a client behind a load balancer would.
Meanwhile portal 1, then portal 2, then router B are restarted (SIGTERM, start
again, wait until ready): the WebSocket through A never breaks and every
request succeeds.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from helpers import needs_postgres
from servers import wait_state
from split_deployment import SplitDeployment, enrol, launch_on, wait_connected

pytestmark = [pytest.mark.slow, pytest.mark.postgres, needs_postgres]


class Echoes(threading.Thread):
    """A WebSocket kept open: a message every 50 ms, each expected back; remembers a failure.

    When told to finish it sends one last message on the same connection.
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.headers = headers
        self.opened = threading.Event()
        self.done = threading.Event()
        self.sent = 0
        self.failure = ""
        self.last = ""

    def echo(self, ws: Any, message: str) -> bool:
        ws.send(message)
        answer = ws.recv(timeout=10)
        if answer != message:
            self.failure = f"sent {message!r}, got {answer!r}"
            return False
        return True

    def run(self) -> None:
        try:
            with connect(self.url, additional_headers=self.headers, open_timeout=10) as ws:
                self.opened.set()
                while not self.done.is_set():
                    if not self.echo(ws, f"echo {self.sent}"):
                        return
                    self.sent += 1
                    time.sleep(0.05)
                if self.echo(ws, "still here"):
                    self.last = "still here"
        except Exception as problem:  # the test reports it
            self.failure = f"{type(problem).__name__}: {problem}"
        finally:
            self.opened.set()


class Requests(threading.Thread):
    """Requests in a loop over both routers; a connection error is retried on the other one."""

    def __init__(self, routers: list[str], headers: dict[str, str], paths: list[str]) -> None:
        super().__init__(daemon=True)
        self.clients = [httpx.Client(base_url=url, headers=headers, timeout=10) for url in routers]
        self.paths = paths
        self.done = threading.Event()
        self.succeeded = 0
        self.retries = 0
        self.failures: list[str] = []

    def one(self, number: int) -> None:
        path = self.paths[number % len(self.paths)]
        deadline = time.monotonic() + 60
        attempt = number
        while True:
            client = self.clients[attempt % len(self.clients)]
            try:
                response = client.get(path)
            except httpx.TransportError as problem:
                # What a client may do: the request did not get an answer, so ask again.
                self.retries += 1
                attempt += 1
                if time.monotonic() > deadline:
                    self.failures.append(f"{path}: no answer for 60 s ({problem!r})")
                    return
                time.sleep(0.1)
                continue
            if response.status_code != 200:
                self.failures.append(
                    f"{path} via {client.base_url}: {response.status_code} {response.text[:300]}"
                )
            else:
                self.succeeded += 1
            return

    def run(self) -> None:
        number = 0
        while not self.done.is_set():
            self.one(number)
            number += 1
            time.sleep(0.02)
        for client in self.clients:
            client.close()


def test_restarting_portals_and_a_router_one_by_one_interrupts_nothing(
    tmp_path: Path, database_url: str
) -> None:
    deployment = SplitDeployment(tmp_path, database_url, portals=2, routers=2)
    echoes: Echoes | None = None
    requests: Requests | None = None
    try:
        deployment.start()
        admin = deployment.admin()
        router_a, router_b = deployment.router_urls
        with httpx.Client(base_url=router_a, headers=admin, timeout=10) as api:
            deployment.add_agent(enrol(api, "box"))
            wait_connected(api, "box", deployment)
            iid = launch_on(api, "box")
            body = wait_state(api, iid, {"running", "failed"}, timeout=60)
            assert body["state"] == "running", (body, deployment.logs())

        echoes = Echoes(f"ws://{router_a.removeprefix('http://')}/i/{iid}/ws", admin)
        echoes.start()
        assert echoes.opened.wait(15) and echoes.failure == "", echoes.failure
        requests = Requests(
            [router_a, router_b], admin, [f"/api/v1/instances/{iid}", f"/i/{iid}/api/info"]
        )
        requests.start()
        time.sleep(1)

        def restart(kind: str, index: int) -> None:
            units = deployment.portals if kind == "portal" else deployment.routers
            began = time.monotonic()
            units[index].stop()
            # Not held open by the routers' route streams or the agent's connection.
            stopping = time.monotonic() - began
            assert stopping < 10, (kind, index, stopping, deployment.logs())
            time.sleep(0.5)  # requests meet the gap
            if kind == "portal":
                deployment.start_portal(index)
            else:
                deployment.start_router(index)
            time.sleep(2)  # and the restarted one, back in use

        restart("portal", 0)
        restart("portal", 1)
        restart("router", 1)

        requests.done.set()
        requests.join(90)
        echoes.done.set()
        echoes.join(15)
        assert echoes.failure == "", (echoes.failure, deployment.logs())
        assert echoes.sent > 50
        assert requests.failures == [], (requests.failures, deployment.logs())
        assert requests.succeeded > 50
        # The loop met router B's restart (connections refused, asked again elsewhere).
        assert requests.retries > 0
        print(
            f"rolling restart: {requests.succeeded} requests answered, {requests.retries} "
            f"retried after a connection error, {echoes.sent} WebSocket echoes"
        )
        # The WebSocket through router A is still the one opened before the restarts.
        assert echoes.last == "still here"
        with httpx.Client(base_url=router_b, headers=admin, timeout=10) as api:
            assert api.get(f"/api/v1/instances/{iid}").json()["state"] == "running"
            # After the restarts the deployment launches as before.
            again = launch_on(api, "box")
            body = wait_state(api, again, {"running", "failed"}, timeout=60)
            assert body["state"] == "running", (body, deployment.logs())
            assert api.get(f"/i/{again}/api/info").status_code == 200
            for instance in (iid, again):
                api.delete(f"/api/v1/instances/{instance}")
                assert wait_state(api, instance, {"stopped", "lost"})["state"] == "stopped"
    finally:
        if requests is not None:
            requests.done.set()
        if echoes is not None:
            echoes.done.set()
            echoes.join(15)
        deployment.stop()
