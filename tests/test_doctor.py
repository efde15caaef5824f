"""``labgate doctor``: checks settings, database, sites and pools, and says what to fix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labgate.cli import app
from servers import free_port


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("LABGATE_"):
            monkeypatch.delenv(name)
    return {"LABGATE_DATA_DIR": str(tmp_path / "var"), "LABGATE_PORT": str(free_port())}


def doctor(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["doctor", *args], env=env)
    return result.exit_code, result.stdout


def test_a_fresh_machine_is_fine(env):
    code, out = doctor(env)
    assert code == 0, out
    assert "ok    data_dir:" in out
    assert "WARN  database:" in out and "`labgate serve` creates the schema" in out
    assert "ok    site local: process backend" in out
    assert "server: not running" in out


def test_problems_are_named_with_their_fix(env, tmp_path):
    env = {
        **env,
        "LABGATE_SITES": json.dumps([{"name": "local"}, {"name": "hpc", "backend": "slurm-nope"}]),
        "LABGATE_POOLS": json.dumps([{"tool": "demo"}, {"tool": "missing", "size": 2}]),
    }
    code, out = doctor(env, "--json")
    assert code == 1
    findings = {(f["level"], f["subject"]) for f in json.loads(out)}
    assert ("fail", "site hpc") in findings
    assert ("fail", "pool missing@local") in findings
    code, out = doctor(env)
    assert "FAIL  site hpc: backend 'slurm-nope': unknown backend" in out
    assert "fix: fix the pool in the pools setting" in out


def test_identity_providers_that_do_not_answer_are_named(env):
    dead = f"http://127.0.0.1:{free_port()}"
    providers = [
        {"name": "local"},
        {"name": "uni", "kind": "oidc", "options": {"issuer": dead, "client_id": "x"}},
        {
            "name": "dir",
            "kind": "ldap",
            "options": {
                "url": f"ldap://127.0.0.1:{free_port()}",
                "user_dn_template": "uid={username}",
            },
        },
    ]
    code, out = doctor({**env, "LABGATE_IDENTITY_PROVIDERS": json.dumps(providers)})
    assert code == 1, out
    assert "ok    identity provider local:" in out
    assert "FAIL  identity provider uni:" in out and "check the issuer option" in out
    assert "FAIL  identity provider dir:" in out and "check the url option" in out
    code, out = doctor({**env, "LABGATE_IDENTITY_PROVIDERS": '[{"name": "x", "kind": "saml"}]'})
    assert "FAIL  identity providers: unknown identity provider kind 'saml'" in out


def test_bad_settings_are_one_finding(env):
    code, out = doctor({**env, "LABGATE_PORT": "70000"})
    assert code == 1
    assert "FAIL  settings:" in out and "port (LABGATE_PORT)" in out


def test_a_container_engine_that_does_not_answer_is_named(env, tmp_path):
    sites = [
        {"name": "local"},
        {
            "name": "pods",
            "backend": "containers",
            "options": {"base_url": f"unix://{tmp_path}/no-podman.sock"},
        },
    ]
    code, out = doctor({**env, "LABGATE_SITES": json.dumps(sites)})
    assert code == 1, out
    assert "FAIL  site pods: the containers engine does not answer:" in out
    assert "podman system service" in out
    assert "ok    site local: process backend" in out


def test_root_without_bubblewrap_is_a_failure(env, tmp_path, monkeypatch):
    """As root, a missing bwrap means launches are refused: doctor says so, with the fix."""
    if os.geteuid() != 0:
        pytest.skip("the root case needs root (labgate's CI runs as root)")
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    code, out = doctor(env)
    assert code == 1, out
    assert "FAIL  site local: bubblewrap is not installed and labgate runs as root" in out
    assert "apt-get install bubblewrap" in out


def test_tools_a_site_cannot_run_say_what_to_install(env, tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "needy.toml").write_text(
        'name = "needy"\ntitle = "Needy"\n[process]\ncommand = ["needy-server"]\n'
        'requires = ["needy-server", "/no/such/file|/nor/this"]\n'
        'install = "apt-get install needy"\n'
    )
    code, out = doctor({**env, "LABGATE_TOOLS_DIR": str(tools)})
    assert code == 0, out  # a tool a site lacks is not a problem
    assert (
        "info  tool needy@local: cannot run here: requires 'needy-server', which is not "
        "installed; install it with: apt-get install needy"
    ) in out
    assert "needy" not in out.split("runs ", 1)[1].splitlines()[0]


def test_without_the_sandbox_tools_with_a_private_network_are_named(env, tmp_path):
    """Unsandboxed, their apps listen on an open loopback port: doctor says which, and the fix."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "webapp.toml").write_text(
        'name = "webapp"\ntitle = "Web app"\n[process]\nprivate_network = true\n'
        'command = ["{python}", "-m", "labgate.tools.gate", "--port", "{port}", "--", "true"]\n'
    )
    env = {**env, "LABGATE_TOOLS_DIR": str(tools)}
    _, out = doctor({**env, "LABGATE_SANDBOX": "none"})
    assert "WARN  site local: without the sandbox " in out, out
    warning = out.split("WARN  site local: without the sandbox ", 1)[1].splitlines()[0]
    assert "webapp" in warning and "demo" not in warning
    assert "reach the app without the instance token" in warning
    assert "install bubblewrap and set sandbox = 'auto', or use a containers site" in out
    if shutil.which("bwrap") is not None:
        _, out = doctor({**env, "LABGATE_SANDBOX": "bwrap"})
        assert "without the sandbox" not in out, out


def test_doctor_says_whether_the_router_runs_compiled_or_python(env, monkeypatch):
    from labgate.router import _native

    _, out = doctor(env, "--json")
    found = {f["subject"]: f for f in json.loads(out)}["router"]
    assert (found["level"] == "ok") == (_native.check() == "compiled"), found
    monkeypatch.setenv(_native.PURE_ENV, "1")
    _, out = doctor(env, "--json")
    found = {f["subject"]: f for f in json.loads(out)}["router"]
    assert found["level"] == "info" and _native.PURE_ENV in found["detail"], found
