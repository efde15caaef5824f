"""The split deployment of deploy/ run for real: the units' own command lines, as processes.

:class:`SplitDeployment` reads ``deploy/systemd/labgate-portal@.service``,
``labgate-router@.service`` and ``labgate-agent.service`` (their ``ExecStart``,
``Environment`` and ``EnvironmentFile`` lines, with the specifiers ``%i`` and
``%H`` expanded) and the example environment files in ``deploy/split/``, puts
test values in place of the examples' (the database, the key, free ports, data
directories under the test's tmp_path) and starts each unit as systemd would
start it: the command line of ``ExecStart`` with that environment. So a unit
or an example that stops working fails the tests (``tests/test_deploy.py``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from helpers import ADMIN_PASSWORD, TEST_SECRET_KEY
from labgate.security import SCOPES
from servers import free_port, processes_with_env, terminate

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SYSTEMD = DEPLOY / "systemd"
EXAMPLES = DEPLOY / "split"
#: Where the units expect labgate; the tests run this checkout's instead.
INSTALLED = "/usr/local/bin/labgate"


@dataclass
class Unit:
    """What systemd would run for one unit (instance): a command line and its environment."""

    name: str
    command: list[str]
    environment: dict[str, str]
    environment_files: list[str] = field(default_factory=list)


def expand(value: str, instance: str) -> str:
    """Expand the unit specifiers the deploy units use (``%i``, ``%H``, ``%%``)."""
    out: list[str] = []
    rest = iter(value)
    for char in rest:
        if char != "%":
            out.append(char)
            continue
        spec = next(rest, "")
        if spec == "i":
            out.append(instance)
        elif spec == "H":
            out.append(socket.gethostname())
        elif spec == "%":
            out.append("%")
        else:
            raise ValueError(f"specifier %{spec} in {value!r}: teach tests/split_deployment.py")
    return "".join(out)


def read_unit(file_name: str, instance: str = "") -> Unit:
    """The ``[Service]`` lines of ``deploy/systemd/<file_name>`` that say what runs."""
    command: list[str] = []
    environment: dict[str, str] = {}
    files: list[str] = []
    section = ""
    for raw in (SYSTEMD / file_name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section != "[Service]":
            continue
        value = expand(value, instance)
        if key == "ExecStart":
            command = shlex.split(value)
        elif key == "Environment":
            for assignment in shlex.split(value):
                name, _, setting = assignment.partition("=")
                environment[name] = setting
        elif key == "EnvironmentFile":
            files.append(value.removeprefix("-"))
    if not command:
        raise AssertionError(f"{file_name} has no ExecStart")
    name = file_name.replace("@.", f"@{instance}.") if instance else file_name
    return Unit(name, command, environment, files)


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an example environment file, in order."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            if not sep:
                raise AssertionError(f"{path.name}: not NAME=value: {raw!r}")
            values[name] = value
    return values


def filled_in(example: Path, values: dict[str, str]) -> dict[str, str]:
    """The example file with test ``values`` in place of its own; every one must be in it."""
    settings = read_env_file(example)
    missing = sorted(set(values) - set(settings))
    if missing:
        raise AssertionError(f"{example.name} no longer sets {missing}")
    return {**settings, **values}


class UnitProcess:
    """One unit, started as systemd would start it (its command and environment)."""

    def __init__(self, unit: Unit, files: dict[str, dict[str, str]], root: Path) -> None:
        self.unit = unit
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
        for name in unit.environment_files:
            env.update(files[name])
        for name, value in unit.environment.items():
            env[name] = self._local(value)
        self.env = env
        labgate = str(Path(sys.executable).with_name("labgate"))
        if unit.command[0] != INSTALLED:
            raise AssertionError(f"{unit.name}: ExecStart should run {INSTALLED}")
        self.command = [labgate, *unit.command[1:]]
        self.log_path = root / f"{unit.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _local(self, value: str) -> str:
        """A path of the real machine (/var/lib/..., /etc/labgate/...) moved under the test's."""
        if value.startswith("/var/lib/"):
            return str(self.root / "var" / value.removeprefix("/var/lib/"))
        if value.startswith("/etc/labgate/"):
            path = self.root / "etc" / value.removeprefix("/etc/labgate/")
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_text("")  # a settings file with nothing in it
            return str(path)
        return value

    def start(self) -> None:
        """Start it (systemd's StateDirectory= makes the data dir: here its parent)."""
        (self.root / "var").mkdir(mode=0o700, parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM and wait (``systemctl stop``)."""
        if self.process is not None:
            terminate(self.process, timeout)
            self.process = None

    def kill(self) -> None:
        """SIGKILL (a crash, the OOM killer)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def log(self) -> str:
        """What it printed (the journal)."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def check_alive(self) -> None:
        """Fail with its log when it exited."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.unit.name} exited: {self.log()[-3000:]}")


def wait_http(url: str, unit: UnitProcess, timeout: float = 60, **kwargs: Any) -> None:
    """Poll ``url`` until it answers 200; fail with the unit's log when it does not."""
    deadline = time.monotonic() + timeout
    while True:
        unit.check_alive()
        try:
            if httpx.get(url, timeout=2, **kwargs).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer: {unit.log()[-3000:]}")
        time.sleep(0.1)


class SplitDeployment:
    """Portals, routers and agents of deploy/ on one machine, on free loopback ports."""

    def __init__(
        self,
        root: Path,
        database_url: str,
        *,
        portals: int = 2,
        routers: int = 1,
        extra: dict[str, str] | None = None,
        public_url: str | None = None,
    ) -> None:
        self.root = root
        self.database_url = database_url
        self.portal_ports = [free_port() for _ in range(portals)]
        self.router_ports = [free_port() for _ in range(routers)]
        self.portal_urls = [f"http://127.0.0.1:{port}" for port in self.portal_ports]
        self.router_urls = [f"http://127.0.0.1:{port}" for port in self.router_ports]
        shared = filled_in(
            EXAMPLES / "labgate.env",
            {
                "LABGATE_DATABASE_URL": database_url,
                "LABGATE_SECRET_KEY": TEST_SECRET_KEY,
                "LABGATE_PUBLIC_URL": public_url or self.router_urls[0],
                "LABGATE_ROUTER_PORTALS": " ".join(self.portal_urls),
                "LABGATE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            },
        )
        # Test pace (not in the example): quick polls and reconnects.
        shared.update({"LABGATE_POLL_INTERVAL": "0.2", **(extra or {})})
        self.files: dict[str, dict[str, str]] = {"/etc/labgate/labgate.env": shared}
        self.portals = [
            UnitProcess(read_unit("labgate-portal@.service", str(port)), self.files, root)
            for port in self.portal_ports
        ]
        self.routers = [
            UnitProcess(read_unit("labgate-router@.service", str(port)), self.files, root)
            for port in self.router_ports
        ]
        self.agents: list[UnitProcess] = []

    def start_portal(self, index: int) -> None:
        """Start portal ``index`` and wait for its /readyz."""
        self.portals[index].start()
        wait_http(f"{self.portal_urls[index]}/readyz", self.portals[index])

    def start_router(self, index: int) -> None:
        """Start router ``index`` and wait until it passes requests to a portal."""
        self.routers[index].start()
        wait_http(f"{self.router_urls[index]}/healthz", self.routers[index])

    def start(self) -> None:
        """The first portal alone (it migrates and makes the admin), the others, the routers."""
        for index in range(len(self.portals)):
            self.start_portal(index)
        for index in range(len(self.routers)):
            self.start_router(index)

    def add_agent(self, token: str, *, via: str | None = None) -> UnitProcess:
        """Start labgate-agent.service for a site with ``token``, dialling ``via`` (router 0)."""
        agent_env = filled_in(
            EXAMPLES / "agent.env",
            {"LABGATE_AGENT_PORTAL": via or self.router_urls[0], "LABGATE_AGENT_TOKEN": token},
        )
        agent_env.update({"LABGATE_POLL_INTERVAL": "0.2", "LABGATE_AGENT_RECONNECT_MAX": "1"})
        files = {**self.files, "/etc/labgate/agent.env": agent_env}
        unit = read_unit("labgate-agent.service")
        unit.name = f"labgate-agent-{len(self.agents)}.service"
        agent = UnitProcess(unit, files, self.root)
        agent.start()
        self.agents.append(agent)
        return agent

    def admin(self, url: str | None = None, verify: ssl.SSLContext | bool = True) -> dict[str, str]:
        """An admin API token's header, made through ``url`` (router 0).

        With an ``https://`` public URL the session cookie is ``Secure``: sign in through it.
        """
        with httpx.Client(base_url=url or self.router_urls[0], timeout=10, verify=verify) as client:
            login = client.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            assert login.status_code == 200, login.text
            created = client.post(
                "/api/v1/tokens",
                json={"note": "tests", "scopes": sorted(SCOPES)},
                headers={"X-CSRF-Token": login.json()["csrf_token"]},
            )
            assert created.status_code == 201, created.text
            return {"Authorization": f"token {created.json()['token']}"}

    def stop(self) -> None:
        """Stop everything, then end the tools still running (instances outlive labgate)."""
        for unit in [*self.agents, *self.routers, *self.portals]:
            unit.stop()
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                ids = list(conn.execute(text("SELECT id FROM instances")).scalars())
        finally:
            engine.dispose()
        for iid in ids:
            for pid in processes_with_env("LABGATE_INSTANCE_ID", iid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        """The tail of every unit's log, for a failing assertion."""
        return "\n".join(
            f"--- {unit.unit.name}\n{unit.log()[-2000:]}"
            for unit in [*self.portals, *self.routers, *self.agents]
        )


def launch_on(client: httpx.Client, site: str, tool: str = "demo") -> str:
    """Launch ``tool`` on ``site`` through the API; the instance id."""
    created = client.post("/api/v1/instances", json={"tool": tool, "site": site})
    assert created.status_code in (200, 201, 202), created.text
    return str(created.json()["id"])


def enrol(client: httpx.Client, name: str, reach: str = "direct") -> str:
    """``labgate site add NAME --backend process --reach REACH`` through the API; its token."""
    created = client.post(
        "/api/v1/sites", json={"name": name, "backend": "process", "reach": reach}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["token"])


def wait_connected(client: httpx.Client, name: str, deployment: SplitDeployment) -> None:
    """Until the site's agent is connected (to any replica)."""
    deadline = time.monotonic() + 60
    while client.get(f"/api/v1/sites/{name}").json().get("status") != "connected":
        assert time.monotonic() < deadline, deployment.logs()
        time.sleep(0.2)


def nginx_binary() -> str:
    """nginx, or "" when this machine has none."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    return found


class FrontDoor:
    """deploy/nginx/labgate.conf run for real: TLS on a free port, over the test's routers."""

    def __init__(self, root: Path, router_ports: list[int], port: int) -> None:
        from helpers import self_signed_certificate

        self.root = root / "nginx"
        self.root.mkdir()
        (self.root / "tmp").mkdir()
        self.cert = self.root / "cert.pem"
        key = self.root / "key.pem"
        self_signed_certificate(self.cert, key)
        self.port = port
        self.plain_port = free_port()
        text = (DEPLOY / "nginx" / "labgate.conf").read_text()
        example_routers = re.findall(r"server 127\.0\.0\.1:(\d+)", text)
        if len(example_routers) != len(router_ports):
            raise AssertionError(f"labgate.conf has routers {example_routers}")
        for example, port in zip(example_routers, router_ports, strict=True):
            text = text.replace(f"127.0.0.1:{example} ", f"127.0.0.1:{port} ")
        replaced = {
            "listen 443 ssl;": f"listen 127.0.0.1:{self.port} ssl;",
            "listen 80;": f"listen 127.0.0.1:{self.plain_port};",
            "/etc/letsencrypt/live/labgate.example.org/fullchain.pem": str(self.cert),
            "/etc/letsencrypt/live/labgate.example.org/privkey.pem": str(key),
        }
        for old, new in replaced.items():
            if old not in text:
                raise AssertionError(f"labgate.conf no longer has {old!r}")
            text = text.replace(old, new)
        site = self.root / "labgate.conf"
        site.write_text(text)
        self.conf = self.root / "nginx.conf"
        self.conf.write_text(
            f"daemon off;\nuser root;\npid {self.root}/nginx.pid;\n"
            f"error_log {self.root}/error.log;\nevents {{ }}\n"
            f"http {{\n access_log off;\n client_body_temp_path {self.root}/tmp;\n"
            f" proxy_temp_path {self.root}/tmp;\n include {site};\n}}\n"
        )
        self.url = f"https://127.0.0.1:{self.port}"
        #: What a client trusts to reach it (the test's own certificate).
        self.verify = ssl.create_default_context(cafile=str(self.cert))
        self.process: subprocess.Popen[bytes] | None = None

    def check(self) -> str:
        """``nginx -t`` on the configuration; its complaints ("" when it is fine)."""
        result = subprocess.run(
            [nginx_binary(), "-t", "-c", str(self.conf), "-p", str(self.root)],
            capture_output=True,
            text=True,
            check=False,
        )
        return "" if result.returncode == 0 else result.stderr

    def start(self) -> None:
        """Run nginx until :meth:`stop`; wait until it answers."""
        self.process = subprocess.Popen(
            [nginx_binary(), "-c", str(self.conf), "-p", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{self.url}/healthz", verify=self.verify, timeout=2)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(
                        (self.root / "error.log").read_text()
                        if (self.root / "error.log").exists()
                        else "nginx did not start"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop nginx."""
        if self.process is not None:
            terminate(self.process, 10)
            self.process = None
