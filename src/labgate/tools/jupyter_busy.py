"""A jupyter_server extension that tells labgate while a kernel is computing.

labgate's culler stops an instance nobody has used for its tool's idle
timeout. A notebook whose kernel computes for hours with the browser closed
sends nothing through the router, so on its own it would look idle. While
any kernel's ``execution_state`` is ``busy``, this extension posts
``POST $LABGATE_API_URL/instances/$LABGATE_INSTANCE_ID/activity`` with
``Authorization: token $LABGATE_INSTANCE_TOKEN`` every
``$LABGATE_BUSY_INTERVAL`` seconds (60 by default), which counts as use (see
docs/operations.md, "Busy reports"). Idle kernels report nothing, so an
instance whose kernels are all idle is still culled.

The built-in ``jupyterlab`` tool loads it with
``--ServerApp.jpserver_extensions={"labgate.tools.jupyter_busy": True}``.
Without the three variables (JupyterLab started outside labgate) it does
nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.ioloop import PeriodicCallback

log = logging.getLogger("labgate.jupyter_busy")

DEFAULT_INTERVAL = 60.0


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """How jupyter_server finds this extension."""
    return [{"module": "labgate.tools.jupyter_busy"}]


class BusyReporter:
    """Posts a "busy" report to labgate whenever a kernel is computing."""

    def __init__(
        self, kernel_manager: Any, url: str, token: str, interval: float = DEFAULT_INTERVAL
    ) -> None:
        self.kernel_manager = kernel_manager
        self.url = url
        self.token = token
        self.interval = interval
        self._failing = False
        self._callback = PeriodicCallback(self.check, interval * 1000)

    def busy(self) -> bool:
        """Whether any kernel is executing now."""
        return any(
            self.kernel_manager.kernel_model(kernel_id).get("execution_state") == "busy"
            for kernel_id in list(self.kernel_manager.list_kernel_ids())
        )

    async def check(self) -> None:
        """Report if busy; a failure is logged once until a report succeeds again."""
        if not self.busy():
            return
        request = HTTPRequest(
            self.url,
            method="POST",
            body=b"",
            headers={"Authorization": f"token {self.token}"},
            request_timeout=10,
        )
        try:
            await AsyncHTTPClient().fetch(request)
        except (HTTPClientError, OSError) as problem:
            if not self._failing:
                log.warning("labgate: could not report busy kernels to %s: %s", self.url, problem)
            self._failing = True
            return
        self._failing = False

    def start(self) -> None:
        """Check every ``interval`` seconds from now on."""
        self._callback.start()


def reporter_from_env(kernel_manager: Any, env: dict[str, str]) -> BusyReporter | None:
    """A reporter configured from labgate's variables, or None outside labgate."""
    api, instance, token = (
        env.get("LABGATE_API_URL", ""),
        env.get("LABGATE_INSTANCE_ID", ""),
        env.get("LABGATE_INSTANCE_TOKEN", ""),
    )
    if not (api and instance and token):
        return None
    try:
        interval = float(env.get("LABGATE_BUSY_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        interval = DEFAULT_INTERVAL
    url = f"{api.rstrip('/')}/instances/{instance}/activity"
    return BusyReporter(kernel_manager, url, token, max(interval, 0.5))


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Start reporting when jupyter_server loads the extension."""
    reporter = reporter_from_env(serverapp.kernel_manager, dict(os.environ))
    if reporter is None:
        serverapp.log.info("labgate busy reports: off (not started by labgate)")
        return
    serverapp.log.info(
        "labgate busy reports: every %g s while a kernel computes", reporter.interval
    )
    reporter.start()
