"""JupyterLab under labgate: its Hub menu leads back to labgate, and no news prompt.

A real JupyterLab (the built-in tool) launched by ``labgate serve``; its page
config is read from the page the router serves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from labgate.tools.jupyter_pageconfig import HUB_PREFIX, NEWS_PLUGIN
from servers import LabgateServer, launch_running

pytestmark = pytest.mark.e2e

PASSWORD = "admin-password-for-pageconfig"
_CONFIG_RE = re.compile(
    r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', re.S
)


def test_the_hub_menu_leads_back_to_labgate_and_news_are_off(tmp_path: Path) -> None:
    pytest.importorskip(
        "jupyterlab", reason="install the jupyter extra: pip install -e '.[jupyter]'"
    )
    server = LabgateServer(tmp_path / "var", PASSWORD)
    server.start()
    try:
        headers = server.token("admin", PASSWORD, ["admin", "account"])
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            instance = launch_running(client, "jupyterlab")
            page = client.get(instance["url"] + "lab")
            assert page.status_code == 200, page.text[:500]
            found = _CONFIG_RE.search(page.text)
            assert found, page.text[:2000]
            config = json.loads(found.group(1))
            assert config["hubPrefix"] == HUB_PREFIX == "/hub/"
            assert config["hubUser"] == "admin"
            assert NEWS_PLUGIN in config["disabledExtensions"]

            # Where the Hub menu's "Hub Control Panel" and restart dialog go.
            for path in ("/hub/home", "/hub/spawn/admin/"):
                back = client.get(path, follow_redirects=False)
                assert back.status_code == 303 and back.headers["location"] == "/instances"
    finally:
        server.stop_instances("admin", PASSWORD)
        server.stop()
