"""An agent that loses its portal replica in the middle of a launch ends on another one.

The split deployment of deploy/ (two portals, a router, an agent dialling the
router, which follows portal 1 and moves to portal 2 when portal 1 fails). A
launch on the agent's site is admitted by portal 1; portal 1 dies (SIGKILL) or
stops (SIGTERM) while the tool is still starting; the agent reconnects through
the router to portal 2. The instance ends running with exactly one tool
process, or failed with a reason: never stuck starting, never started twice.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import httpx
import pytest

from helpers import needs_postgres
from servers import processes_with_env, wait_state
from split_deployment import SplitDeployment, enrol, launch_on, wait_connected
from tools_fixtures import DEMO_COMMAND

pytestmark = [pytest.mark.slow, pytest.mark.postgres, needs_postgres]

#: Seconds the tool takes to listen: portal 1 goes away in the middle of it.
START_DELAY = 4


def demo_servers(iid: str) -> list[int]:
    """Pids of the instance's demo servers (not the sandbox or launchers in front of them)."""
    found = []
    for pid in processes_with_env("LABGATE_INSTANCE_ID", iid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[1:3] == [b"-m", b"labgate.tools.demo"]:
                found.append(pid)
    return found


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_an_agent_moving_to_another_replica_mid_launch_runs_the_instance_once(
    tmp_path: Path, database_url: str, how: str
) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "slowstart.toml").write_text(
        'name = "slowstart"\ntitle = "Slow demo"\nhealth_path = "/api/health"\n'
        f"start_timeout = 60\n\n[process]\n{DEMO_COMMAND}\n"
        f'env = {{ DEMO_START_DELAY = "{START_DELAY}" }}\n'
    )
    deployment = SplitDeployment(
        tmp_path,
        database_url,
        portals=2,
        routers=1,
        extra={"LABGATE_TOOLS_DIR": str(tools), "LABGATE_LEADER_LEASE_SECONDS": "2"},
    )
    try:
        deployment.start()
        admin = deployment.admin()
        router = deployment.router_urls[0]
        with httpx.Client(base_url=router, headers=admin, timeout=10) as api:
            deployment.add_agent(enrol(api, "box"))
            wait_connected(api, "box", deployment)
            iid = launch_on(api, "box", "slowstart")
            wait_state(api, iid, {"starting"}, timeout=30)
            time.sleep(1)
        assert len(demo_servers(iid)) <= 1

        first = deployment.portals[0]
        if how == "kill":
            first.kill()
        else:
            first.stop()
        # Through the router, now on portal 2; the agent comes back there by itself.
        with httpx.Client(base_url=router, headers=admin, timeout=10) as api:
            body = wait_state(api, iid, {"running", "failed", "lost"}, timeout=60)
            assert body["state"] == "running", (body, deployment.logs())
            # Let the new leader reconcile and the agent's reports settle: nothing changes.
            time.sleep(6)
            body = api.get(f"/api/v1/instances/{iid}").json()
            assert body["state"] == "running", (body, deployment.logs())
            assert len(demo_servers(iid)) == 1, deployment.logs()
            # The agent is on portal 2 now.
            site = httpx.get(
                f"{deployment.portal_urls[1]}/api/v1/sites/box", headers=admin, timeout=10
            ).json()
            assert site["live"] is True, site
            page = api.get(f"/i/{iid}/api/info")
            assert page.status_code == 200, page.text
            api.delete(f"/api/v1/instances/{iid}")
            assert wait_state(api, iid, {"stopped", "lost"})["state"] == "stopped"
        assert demo_servers(iid) == []
    finally:
        deployment.stop()
