"""A third-party backend through the one backend contract, end to end.

The ``echo`` backend (tests/plugins/labgate_echo_backend) is its own package:
installed here with pip into the running virtualenv, it registers itself in
the ``labgate.backends`` entry-point group. Nothing in labgate names it: the
catalog validates the tools' ``[echo]`` tables with its schema, a site is
configured with it, and a launch through the portal API runs on it and is
reached through the router.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import ADMIN_PASSWORD, TEST_SECRET_KEY, wait_for_state
from labgate.backends.base import available_backends, load_backend
from labgate.backends.registry import load_catalog, tool_unavailable_reason
from labgate.config import Settings, SiteConfig
from labgate.doctor import check_sites
from labgate.errors import ConfigError
from labgate.startup import build_backend

PLUGIN = Path(__file__).parent.parent / "plugins" / "labgate_echo_backend"
ECHO_TOOL = """
name = "echo-demo"
title = "Demo on the echo backend"
health_path = "/api/health"
start_timeout = 30

[echo]
argv = ["{python}", "-m", "labgate.tools.demo", "--port", "{port}", "--base-url", "{base_url}"]
"""


def pip(*args: str) -> None:
    """Run this interpreter's pip; fail the test with its output when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def echo_backend() -> Iterator[None]:
    """The echo backend package, installed into the running virtualenv for this module."""
    pip("install", "--quiet", "--no-deps", "--no-build-isolation", str(PLUGIN))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        pip("uninstall", "--quiet", "--yes", "labgate-echo-backend")
        importlib.invalidate_caches()
        sys.modules.pop("labgate_echo_backend", None)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, echo_backend: None) -> Settings:
    """One site on the echo backend; the tools directory holds a tool with an [echo] table."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "echo-demo.toml").write_text(ECHO_TOOL)
    return Settings(
        data_dir=tmp_path / "var",
        tools_dir=tools,
        database_url=database_url,
        admin_password=ADMIN_PASSWORD,
        secret_key=TEST_SECRET_KEY,
        poll_interval=0.2,
        stop_grace_seconds=3,
        sites=[SiteConfig(name="echoes", backend="echo", options={"host": "127.0.0.1"})],
    )


def test_the_catalog_validates_the_plugins_table(settings: Settings) -> None:
    assert "echo" in available_backends()
    catalog = load_catalog(settings.tools_dir)
    tool = catalog.get("echo-demo")
    assert tool is not None
    assert [p for p in catalog.problems if p.file.endswith("echo-demo.toml")] == []
    assert tool_unavailable_reason(tool, "echo") is None
    assert tool_unavailable_reason(tool, "process") == "no [process] section"
    demo = catalog.get("demo")
    assert demo is not None and tool_unavailable_reason(demo, "echo") == "no [echo] section"


def test_a_bad_table_leaves_the_tool_unavailable_on_that_backend_only(
    settings: Settings,
) -> None:
    assert settings.tools_dir is not None
    head = 'name = "two"\ntitle = "Two"\n[process]\ncommand = ["true"]\n'
    (settings.tools_dir / "two.toml").write_text(head + '[echo]\nargv = ["{nosuch}"]\n')
    (settings.tools_dir / "empty.toml").write_text(
        head.replace("two", "empty") + "[echo]\nargv = []\n"
    )
    catalog = load_catalog(settings.tools_dir)
    two, empty = catalog.get("two"), catalog.get("empty")
    assert two is not None and empty is not None
    assert tool_unavailable_reason(two, "process") is None
    assert "unknown placeholder" in (tool_unavailable_reason(two, "echo") or "")
    assert tool_unavailable_reason(empty, "process") is None
    reason = tool_unavailable_reason(empty, "echo") or ""
    assert reason.startswith("[echo] argv: List should have at least 1 item"), reason
    assert [p.reason for p in catalog.problems if p.file.endswith("empty.toml")] == [
        f"{reason}: cannot run on the echo backend"
    ]


def test_the_site_options_are_the_plugins_schema(settings: Settings) -> None:
    backend = build_backend(settings, settings.effective_sites[0])
    assert backend.name == "echo" and backend.site_options.model_dump() == {"host": "127.0.0.1"}
    bad = SiteConfig(name="echoes", backend="echo", options={"nosuch": 1})
    with pytest.raises(ConfigError, match=r"'echoes'.*options\.nosuch"):
        build_backend(settings, bad)
    assert load_backend("echo").snapshot_kind == ""


def test_doctor_asks_the_plugin(settings: Settings) -> None:
    findings = [(f.level, f.detail) for f in check_sites(settings)]
    assert ("ok", "echo engine: child processes on 127.0.0.1") in findings
    assert ("ok", "echo backend; runs echo-demo") in findings


async def test_a_launch_runs_on_the_plugin_behind_the_router(
    client: httpx.AsyncClient, make_user, router_url: str
) -> None:
    alice = await make_user("alice")
    tools = (await client.get("/api/v1/tools", headers=alice)).json()
    assert {t["name"]: t["available"] for t in tools}["echo-demo"] is True
    launched = await client.post("/api/v1/instances", json={"tool": "echo-demo"}, headers=alice)
    assert launched.status_code == 202, launched.text
    iid = launched.json()["id"]
    body = await wait_for_state(client, alice, iid, {"running", "failed"})
    assert body["state"] == "running", body
    assert body["site"] == "echoes"

    async with httpx.AsyncClient(base_url=router_url, headers=alice, timeout=10) as router:
        info = await router.get(f"/i/{iid}/api/info")
    assert info.status_code == 200, info.text
    logs = (await client.get(f"/api/v1/instances/{iid}/logs", headers=alice)).json()
    assert "demo: listening" in logs["text"]

    snapshot = await client.post(
        f"/api/v1/instances/{iid}/snapshot", json={"name": "keep"}, headers=alice
    )
    assert snapshot.status_code == 409, snapshot.text
    assert snapshot.json()["error"] == "snapshot_unsupported"

    stopped = await client.delete(f"/api/v1/instances/{iid}", headers=alice)
    assert stopped.status_code == 202, stopped.text
    await wait_for_state(client, alice, iid, {"stopped"})
    async with httpx.AsyncClient(base_url=router_url, headers=alice, timeout=10) as router:
        gone = await router.get(f"/i/{iid}/api/info")
    assert gone.status_code != 200
