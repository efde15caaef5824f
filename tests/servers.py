"""Real ``labgate serve`` processes for tests, on random loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from helpers import TEST_SECRET_KEY

_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (on loopback unless ``host`` says otherwise).

    Never the same port twice in one test process: ports picked one after the
    other before anything binds them (a deployment's portals and routers) could
    otherwise be the same port, and the second program to start fails to bind.
    """
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of processes whose environment has ``name=value`` (finds a tool's children too)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def terminate(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM and wait; SIGKILL when it does not end in ``timeout`` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_state(client: httpx.Client, iid: str, states: set[str], timeout: float = 120) -> dict:
    """Poll an instance through the API until it is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict = client.get(f"/api/v1/instances/{iid}").json()
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def launch_running(client: httpx.Client, tool: str) -> dict:
    """Launch ``tool`` through the API and wait until it runs; the instance."""
    created = client.post("/api/v1/instances", json={"tool": tool})
    assert created.status_code == 202, created.text
    instance = wait_state(client, created.json()["id"], {"running", "failed"})
    assert instance["state"] == "running", instance
    return instance


class LabgateServer:
    """``labgate serve`` in a subprocess with its own data dir.

    It listens on ``host`` (loopback unless a test gives the address of an
    interface it made, e.g. the host end of a network namespace's link).
    """

    def __init__(
        self,
        data_dir: Path,
        admin_password: str,
        *,
        host: str = "127.0.0.1",
        command: str = "serve",
        **env: str,
    ) -> None:
        self.data_dir = data_dir
        #: ``serve``, or ``portal`` for a portal replica (needs LABGATE_DATABASE_URL).
        self.command = command
        self.port = free_port(host)
        # With LABGATE_TLS_CERT_FILE it serves HTTPS: that (self-signed) certificate is trusted.
        cert = env.get("LABGATE_TLS_CERT_FILE")
        self.verify: ssl.SSLContext | bool = True
        if cert:
            self.verify = ssl.create_default_context(cafile=cert)
        self.url = f"{'https' if cert else 'http'}://{host}:{self.port}"
        self.log_path = data_dir.parent / f"{command}-{self.port}.log"
        self.env = {
            **os.environ,
            "LABGATE_DATA_DIR": str(data_dir),
            "LABGATE_PORT": str(self.port),
            "LABGATE_HOST": host,
            "LABGATE_ADMIN_PASSWORD": admin_password,
            "LABGATE_SECRET_KEY": TEST_SECRET_KEY,
            "LABGATE_POLL_INTERVAL": "0.2",
            **env,
        }
        self.env.pop("LABGATE_CONFIG", None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        """Start and wait until /healthz answers; a server that does not is stopped."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "labgate", self.command],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"labgate {self.command} exited: {self.log_path.read_text()[-3000:]}"
                )
            try:
                answer = httpx.get(f"{self.url}/healthz", timeout=1, verify=self.verify)
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()  # a fixture that fails here has no teardown to stop it
        raise RuntimeError(
            f"labgate {self.command} did not start in {timeout:g} s: "
            f"{self.log_path.read_text()[-3000:]}"
        )

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM and wait; the way an operator restarts it."""
        if self.process is None:
            return
        terminate(self.process, timeout)
        self.process = None

    def stop_instances(self, username: str, password: str, timeout: float = 30) -> None:
        """Stop every instance (tests must not leave tools running); needs an admin."""
        if self.process is None:
            return
        headers = self.token(username, password, ["admin", "account"])
        with httpx.Client(
            base_url=self.url, headers=headers, timeout=10, verify=self.verify
        ) as client:
            for instance in client.get("/api/v1/instances?active=true").json():
                client.delete(f"/api/v1/instances/{instance['id']}")
            deadline = time.monotonic() + timeout
            while client.get("/api/v1/instances?active=true").json():
                if time.monotonic() > deadline:
                    raise RuntimeError("instances did not stop")
                time.sleep(0.1)

    def token(
        self, username: str, password: str, scopes: list[str] | None = None
    ) -> dict[str, str]:
        """Sign in and create an API token; returns the Authorization header."""
        with httpx.Client(base_url=self.url, timeout=10, verify=self.verify) as client:
            login = client.post(
                "/api/v1/auth/login", json={"username": username, "password": password}
            )
            login.raise_for_status()
            body: dict[str, object] = {"note": "tests"}
            if scopes is not None:
                body["scopes"] = scopes
            created = client.post(
                "/api/v1/tokens", json=body, headers={"X-CSRF-Token": login.json()["csrf_token"]}
            )
            created.raise_for_status()
            return {"Authorization": f"token {created.json()['token']}"}


IDENTITY_TESTS = Path(__file__).parent / "identity"


class OIDCProvider:
    """npm's oidc-provider (``tests/identity/oidc_provider.mjs``) on a free loopback port.

    Its client ``labgate`` (secret ``labgate-test-secret``) may return to
    ``callbacks``. Its own sign-in page takes an account's subject (``a-1f3e``
    is alice) and any password.
    """

    CLIENT_ID = "labgate"
    CLIENT_SECRET = "labgate-test-secret"

    def __init__(self, callbacks: list[str]) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.callbacks = callbacks
        self.process: subprocess.Popen[str] | None = None

    @staticmethod
    def missing() -> str | None:
        """Why the provider cannot run here (with the command that fixes it), or None."""
        if not (IDENTITY_TESTS / "node_modules" / "oidc-provider").is_dir():
            return "needs node and oidc-provider: npm ci --prefix tests/identity"
        return None

    def start(self) -> None:
        """Start it and wait until it serves."""
        self.process = subprocess.Popen(
            ["node", str(IDENTITY_TESTS / "oidc_provider.mjs"), str(self.port), *self.callbacks],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"oidc-provider did not start: {line!r}")

    def stop(self) -> None:
        """Stop it."""
        if self.process is not None:
            terminate(self.process, 10)
            self.process = None

    def options(self) -> dict[str, str]:
        """The ``options`` of a labgate ``oidc`` provider using it."""
        return {
            "issuer": self.issuer,
            "client_id": self.CLIENT_ID,
            "client_secret": self.CLIENT_SECRET,
            "scopes": "openid profile email groups",
        }
