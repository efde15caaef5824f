"""Launch benchmark: labgate (cold and warm pool) beside JupyterHub, one run, one machine.

Everything runs on loopback and stops by itself::

    .venv/bin/python benchmarks/launch.py                  # full run, about 10 minutes
    .venv/bin/python benchmarks/launch.py --quick          # fewer samples, 20 at once
    .venv/bin/python benchmarks/launch.py --skip-jupyterhub
    .venv/bin/python benchmarks/launch.py --storm 50 100   # JupyterLab storms only

What is timed, each time from the API call until the first 200 through the
front door (labgate's router; JupyterHub's configurable-http-proxy):

- labgate ``demo`` and ``jupyterlab``, cold (``labgate serve`` without pools)
  and from a warm pool (``serve`` again with ``pools``), one launch at a time;
- JupyterHub (from PyPI, ``SimpleLocalProcessSpawner``, configurable-http-proxy)
  starting the same JupyterLab, one at a time;
- ``--concurrent`` (50) launches at once, one per user: labgate ``demo``,
  labgate ``jupyterlab`` and JupyterHub's JupyterLab: p50, p95, failures;
- ``--storm N [N ...]`` instead of all that: one JupyterLab launch alone, then
  N JupyterLab launches at once (one per user), on labgate and on JupyterHub.
  For labgate also the CPU ``serve`` spent on each batch of launches, then how
  long stopping every instance at once took (a class ending) and its CPU.

Both start JupyterLab under the same start timeout, ``--start-timeout``
(120 s): labgate's JupyterLab tool file is copied with that ``start_timeout``
and no ``start_grace``; JupyterHub gets it as ``Spawner.start_timeout`` and
``Spawner.http_timeout``. (labgate's budget counts from when the tool's
process starts, after any wait in its site's start queue; JupyterHub's from
the spawn request.) ``--timeout`` is how long the benchmark itself waits for
one launch.

The first 200 is ``GET /i/<id>/api/health`` (demo) or ``/i/<id>/api``
(JupyterLab) on labgate and ``GET /user/<name>/api`` on JupyterHub, polled
every 10 ms (every 100 ms when many launches run at once) without following
redirects, so a spawn-pending page never counts. Between single launches
the instance is stopped and the machine left to settle.

JupyterHub and JupyterLab are installed into ``benchmarks/.cache/jhub`` (a venv
of its own; JupyterLab pinned to the version labgate's venv has), and
configurable-http-proxy with npm into ``benchmarks/.cache``. Results: a
Markdown table on stdout and JSON in ``benchmarks/results/launch.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
JHUB = CACHE / "jhub"
PY = sys.executable
ADMIN_PASSWORD = "bench-admin-password"
USER_PASSWORD = "bench-user-password"
HEALTH = {"demo": "api/health", "jupyterlab": "api"}


# --------------------------------------------------------------------------- helpers
def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def over_all(times: list[float], failures: int, q: float) -> float | None:
    """The ``q`` quantile over every launch, a failed one counting as never ready (None)."""
    value = percentile(sorted(times) + [math.inf] * failures, q)
    return None if math.isinf(value) else value


def summary(times: list[float], failures: int = 0) -> dict[str, Any]:
    """p50, p95, mean, min, max (seconds) of successful launches, and failures.

    ``p50_all`` and ``p95_all`` are over every launch, a failure counting as
    never ready (``None`` when the quantile falls on one): a user whose
    launch failed waited for ever, not not at all.
    """
    ordered = sorted(times)
    over = {
        "p50_all": over_all(ordered, failures, 0.5),
        "p95_all": over_all(ordered, failures, 0.95),
    }
    if not ordered:
        return {"n": 0, "failures": failures, **over}

    def pct(q: float) -> float:
        return percentile(ordered, q)

    return {
        "n": len(ordered),
        "failures": failures,
        **over,
        "p50": statistics.median(ordered),
        "p95": pct(0.95),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
    }


async def first_200(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    deadline: float,
    every: float,
    gone: Callable[[], Awaitable[str | None]] | None = None,
    ask_on: tuple[int, ...] = (404,),
) -> None:
    """Poll ``url`` until it answers 200 (redirects are not followed).

    An answer in ``ask_on`` asks ``gone`` (at most once a second) whether the
    launch ended, and why: a failed launch is a failure soon, not a timeout.
    """
    next_ask = 0.0
    while True:
        with contextlib.suppress(httpx.HTTPError):
            response = await client.get(url, headers=headers)
            if response.status_code == 200:
                return
            if response.status_code in ask_on and gone is not None and time.monotonic() > next_ask:
                next_ask = time.monotonic() + 1.0
                reason = await gone()
                if reason is not None:
                    raise RuntimeError(f"{url}: {reason}")
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        await asyncio.sleep(every)


def ensure_chp() -> str:
    """configurable-http-proxy from npm, in the cache benchmarks/router.py also uses."""
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    chp = CACHE / "node_modules" / ".bin" / "configurable-http-proxy"
    if not chp.exists():
        npm = ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE)]
        subprocess.run([*npm, "configurable-http-proxy"], check=True)
    return str(chp)


def ensure_jupyterhub() -> Path:
    """A venv with JupyterHub and the JupyterLab labgate's venv has."""
    hub = JHUB / "bin" / "jupyterhub"
    if not hub.exists():
        log("installing JupyterHub and JupyterLab into benchmarks/.cache/jhub")
        subprocess.run([PY, "-m", "venv", str(JHUB)], check=True)
        pins = [
            f"jupyterlab=={version('jupyterlab')}",
            f"jupyter_server=={version('jupyter_server')}",
        ]
        pip = [str(JHUB / "bin" / "pip"), "install", "-q", "jupyterhub", *pins]
        subprocess.run(pip, check=True)
    return JHUB / "bin"


# --------------------------------------------------------------------------- labgate
def equal_timeout_tools(directory: Path, start_timeout: float) -> Path:
    """labgate's JupyterLab tool file with ``start_timeout`` and no grace (as JupyterHub)."""
    from labgate.tools.catalog import BUILTIN_DIR

    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (BUILTIN_DIR / "jupyterlab.toml").read_text().splitlines():
        if line.startswith("start_timeout"):
            line = f"start_timeout = {start_timeout:g}"
        elif line.startswith("start_grace"):
            line = "start_grace = 0"
        lines.append(line)
    (directory / "jupyterlab.toml").write_text("\n".join(lines) + "\n")
    return directory


class Labgate:
    """``labgate serve`` in a subprocess, with users and tokens for the benchmark."""

    def __init__(
        self, work: Path, pools: list[dict[str, Any]] | None = None, start_timeout: float = 120
    ) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")},
            "LABGATE_DATA_DIR": str(work / "var"),
            "LABGATE_PORT": str(self.port),
            "LABGATE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "LABGATE_MAX_INSTANCES_PER_USER": "1000",
            "LABGATE_POLL_INTERVAL": "1",
            "LABGATE_STOP_GRACE_SECONDS": "5",
            "LABGATE_POOLS": json.dumps(pools or []),
            "LABGATE_POOL_CHECK_INTERVAL": "1",
            "LABGATE_TOOLS_DIR": str(equal_timeout_tools(work / "tools", start_timeout)),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.tokens: dict[str, dict[str, str]] = {}

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        log_file = (self.work / "serve.log").open("ab")
        self.process = subprocess.Popen(
            [PY, "-m", "labgate", "serve"], env=self.env, stdout=log_file, stderr=log_file
        )
        async with httpx.AsyncClient(base_url=self.url) as client:
            await first_200(client, "/readyz", {}, time.monotonic() + 60, 0.1)
            self.tokens["admin"] = await self._token(client, "admin", ADMIN_PASSWORD)

    async def _token(self, client: httpx.AsyncClient, user: str, password: str) -> dict[str, str]:
        login = await client.post(
            "/api/v1/auth/login", json={"username": user, "password": password}
        )
        login.raise_for_status()
        body = {"note": "bench", "scopes": login.json()["scopes"]}
        created = await client.post(
            "/api/v1/tokens", json=body, headers={"X-CSRF-Token": login.json()["csrf_token"]}
        )
        created.raise_for_status()
        client.cookies.clear()
        return {"Authorization": f"token {created.json()['token']}"}

    async def users(self, count: int) -> list[str]:
        """``count`` users with tokens (created once)."""
        names = [f"u{n:03d}" for n in range(count)]
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            for name in names:
                if name in self.tokens:
                    continue
                await client.post(
                    "/api/v1/users",
                    json={"name": name, "password": USER_PASSWORD},
                    headers=self.tokens["admin"],
                )
                self.tokens[name] = await self._token(client, name, USER_PASSWORD)
        return names

    async def launch(
        self, client: httpx.AsyncClient, user: str, tool: str, every: float, timeout: float
    ) -> tuple[str, float, bool]:
        """Launch ``tool`` as ``user``: the id, the seconds to the first 200 via the router,
        and whether it was a warm claim (the API answers a claim already ``running``)."""
        headers = self.tokens[user]
        begun = time.monotonic()
        response = await client.post("/api/v1/instances", json={"tool": tool}, headers=headers)
        response.raise_for_status()
        iid = response.json()["id"]
        claimed = response.json()["state"] == "running"

        async def gone() -> str | None:
            shown = (await client.get(f"/api/v1/instances/{iid}", headers=headers)).json()
            ended = shown["state"] in ("failed", "lost", "stopped")
            return f"{shown['state']}: {shown['reason']}" if ended else None

        url = f"/i/{iid}/{HEALTH[tool]}"
        await first_200(client, url, headers, begun + timeout, every, gone)
        return iid, time.monotonic() - begun, claimed

    async def stop_one(self, client: httpx.AsyncClient, iid: str) -> None:
        """Stop one instance and wait until it has."""
        admin = self.tokens["admin"]
        await client.delete(f"/api/v1/instances/{iid}", headers=admin)
        deadline = time.monotonic() + 120
        while (await client.get(f"/api/v1/instances/{iid}", headers=admin)).json()["state"] not in (
            "stopped",
            "failed",
            "lost",
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{iid} did not stop")
            await asyncio.sleep(0.1)

    async def stop_all(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            admin = self.tokens["admin"]
            for instance in (
                await client.get("/api/v1/instances?active=true", headers=admin)
            ).json():
                await client.delete(f"/api/v1/instances/{instance['id']}", headers=admin)
            deadline = time.monotonic() + 120
            while (await client.get("/api/v1/instances?active=true", headers=admin)).json():
                if time.monotonic() > deadline:
                    raise RuntimeError("instances did not stop")
                await asyncio.sleep(0.2)

    async def pools_ready(self, timeout: float = 300) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            deadline = time.monotonic() + timeout
            while True:
                pools = (await client.get("/api/v1/pools", headers=self.tokens["admin"])).json()
                if all(p["ready"] >= p["size"] for p in pools):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pools not ready: {pools}")
                await asyncio.sleep(0.2)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the ``labgate serve`` process so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:13]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None


async def labgate_singles(
    lg: Labgate, tool: str, samples: int, *, warm: bool, timeout: float
) -> dict[str, Any]:
    times, failures = [], 0
    async with httpx.AsyncClient(base_url=lg.url, timeout=60) as client:
        for _ in range(samples):
            if warm:
                await lg.pools_ready()
            await asyncio.sleep(1)  # let the machine settle
            try:
                iid, seconds, claimed = await lg.launch(client, "u000", tool, 0.01, timeout)
                if warm and not claimed:
                    # A warm-pool launch that started cold is a failure of the pool, not a sample.
                    log(f"{tool} launch {iid} did not claim a warm instance")
                    failures += 1
                else:
                    times.append(seconds)
                await lg.stop_one(client, iid)
            except Exception as exc:
                log(f"{tool} launch failed: {exc!r}")
                failures += 1
                await lg.stop_all()
    return summary(times, failures)


async def at_once(
    launchers: list[Callable[[], Awaitable[float]]],
) -> dict[str, Any]:
    results = await asyncio.gather(*(launch() for launch in launchers), return_exceptions=True)
    times = [r for r in results if isinstance(r, float)]
    errors = [r for r in results if not isinstance(r, float)]
    for error in errors[:3]:
        log(f"failed: {error!r}")
    return summary(times, len(errors))


async def labgate_concurrent(
    lg: Labgate, tool: str, count: int, timeout: float, every: float = 0.1
) -> dict[str, Any]:
    users = await lg.users(count)
    limits = httpx.Limits(max_connections=count * 2, max_keepalive_connections=count * 2)
    async with httpx.AsyncClient(base_url=lg.url, timeout=timeout, limits=limits) as client:

        def launcher(user: str) -> Callable[[], Awaitable[float]]:
            async def go() -> float:
                return (await lg.launch(client, user, tool, every, timeout))[1]

            return go

        cpu = lg.cpu_seconds()
        result = await at_once([launcher(u) for u in users])
        result["serve_cpu_s"] = lg.cpu_seconds() - cpu
    # The class ends: every instance stopped at once. Wall time and the CPU of `serve`.
    cpu, begun = lg.cpu_seconds(), time.monotonic()
    await lg.stop_all()
    result["stop_all_s"] = time.monotonic() - begun
    result["stop_all_serve_cpu_s"] = lg.cpu_seconds() - cpu
    return result


# --------------------------------------------------------------------------- JupyterHub
class JupyterHub:
    """JupyterHub with SimpleLocalProcessSpawner behind configurable-http-proxy."""

    def __init__(self, work: Path, bin_dir: Path, chp: str, start_timeout: float = 120) -> None:
        self.work = work
        self.start_timeout = start_timeout
        self.bin = bin_dir
        self.chp = chp
        self.port, self.hub_port, self.api_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(32)
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        homes = self.work / "homes"
        return f"""
c.JupyterHub.bind_url = "http://127.0.0.1:{self.port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{self.hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.api_port}"
c.ConfigurableHTTPProxy.command = [{self.chp!r}]
c.JupyterHub.db_url = "sqlite:///{self.work / "jupyterhub.sqlite"}"
c.JupyterHub.cookie_secret_file = "{self.work / "cookie_secret"}"
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{homes}/{{username}}"
c.Spawner.cmd = [{str(self.bin / "jupyterhub-singleuser")!r}]
c.Spawner.args = ["--allow-root"]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = {self.start_timeout:g}
c.Spawner.http_timeout = {self.start_timeout:g}
c.JupyterHub.concurrent_spawn_limit = 500
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.services = [{{"name": "bench", "api_token": {self.token!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "bench",
    "scopes": ["admin:users", "admin:servers", "access:servers", "list:users", "read:users"],
    "services": ["bench"],
}}]
c.JupyterHub.cleanup_servers = True
"""

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "homes").mkdir(exist_ok=True)
        config = self.work / "jupyterhub_config.py"
        config.write_text(self.config())
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}
        log_file = (self.work / "hub.log").open("ab")
        self.process = subprocess.Popen(
            [str(self.bin / "jupyterhub"), "-f", str(config)],
            cwd=self.work,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
        async with httpx.AsyncClient(base_url=self.url) as client:
            await first_200(client, "/hub/api/", self.headers, time.monotonic() + 120, 0.2)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    async def users(self, count: int) -> list[str]:
        names = [f"u{n:03d}" for n in range(count)]
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            existing = {
                u["name"] for u in (await client.get("/hub/api/users", headers=self.headers)).json()
            }
            missing = [n for n in names if n not in existing]
            if missing:
                created = await client.post(
                    "/hub/api/users", json={"usernames": missing}, headers=self.headers
                )
                created.raise_for_status()
        return names

    async def launch(
        self, client: httpx.AsyncClient, user: str, every: float, timeout: float
    ) -> float:
        begun = time.monotonic()
        response = await client.post(f"/hub/api/users/{user}/server", headers=self.headers)
        if response.status_code not in (201, 202):
            raise RuntimeError(f"spawn {user}: {response.status_code} {response.text[:200]}")

        async def gone() -> str | None:
            model = (await client.get(f"/hub/api/users/{user}", headers=self.headers)).json()
            if model.get("servers") or model.get("pending"):
                return None
            return "the server stopped before it answered (see hub.log)"

        url = f"/user/{user}/api"
        await first_200(client, url, self.headers, begun + timeout, every, gone, (302, 404))
        return time.monotonic() - begun

    async def stop_all(self, users: list[str]) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            for user in users:
                await client.delete(f"/hub/api/users/{user}/server", headers=self.headers)
            deadline = time.monotonic() + 180
            while True:
                listed = (await client.get("/hub/api/users", headers=self.headers)).json()
                if not any(u.get("servers") for u in listed):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("JupyterHub servers did not stop")
                await asyncio.sleep(0.3)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the ``labgate serve`` process so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:13]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None


async def hub_singles(hub: JupyterHub, samples: int, timeout: float) -> dict[str, Any]:
    users = await hub.users(1)
    times, failures = [], 0
    async with httpx.AsyncClient(base_url=hub.url, timeout=60) as client:
        for _ in range(samples):
            await asyncio.sleep(1)
            try:
                times.append(await hub.launch(client, users[0], 0.01, timeout))
            except Exception as exc:
                log(f"JupyterHub launch failed: {exc!r}")
                failures += 1
            await hub.stop_all(users)
    return summary(times, failures)


async def hub_concurrent(
    hub: JupyterHub, count: int, timeout: float, every: float = 0.1
) -> dict[str, Any]:
    users = await hub.users(count)
    limits = httpx.Limits(max_connections=count * 2, max_keepalive_connections=count * 2)
    async with httpx.AsyncClient(base_url=hub.url, timeout=timeout, limits=limits) as client:

        def launcher(user: str) -> Callable[[], Awaitable[float]]:
            async def go() -> float:
                return await hub.launch(client, user, every, timeout)

            return go

        result = await at_once([launcher(u) for u in users])
    await hub.stop_all(users)
    return result


# --------------------------------------------------------------------------- the run
def new_hub(work: Path, args: argparse.Namespace, results: dict[str, Any]) -> JupyterHub:
    """The JupyterHub of this run (installed on first use), its version noted."""
    hub = JupyterHub(work / "jupyterhub", ensure_jupyterhub(), ensure_chp(), args.start_timeout)
    results["machine"]["jupyterhub"] = subprocess.run(
        [str(hub.bin / "jupyterhub"), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return hub


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = CACHE / "launch-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_before": os.getloadavg()[0],
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "jupyterlab": version("jupyterlab"),
        },
        "args": vars(args),
        "single": {},
        "concurrent": {},
    }
    tools = ["demo"] + ([] if args.skip_jupyterlab else ["jupyterlab"])
    samples = {"demo": args.samples, "jupyterlab": args.jupyter_samples}

    if args.storm:
        return await storms(args, work, results)
    log("labgate without pools: cold launches")
    lg = Labgate(work / "cold", start_timeout=args.start_timeout)
    try:
        await lg.start()
        await lg.users(1)
        for tool in tools:
            log(f"labgate cold {tool} x{samples[tool]}")
            results["single"][f"labgate cold {tool}"] = await labgate_singles(
                lg, tool, samples[tool], warm=False, timeout=args.timeout
            )
        for tool in tools:
            log(f"labgate: {args.concurrent} {tool} launches at once")
            results["concurrent"][f"labgate {tool}"] = await labgate_concurrent(
                lg, tool, args.concurrent, args.timeout
            )
    finally:
        with contextlib.suppress(Exception):
            await lg.stop_all()
        lg.stop()

    log("labgate with warm pools")
    pools = [{"tool": tool, "size": 2 if tool == "demo" else 1} for tool in tools]
    lg = Labgate(work / "warm", pools, start_timeout=args.start_timeout)
    try:
        await lg.start()
        await lg.users(1)
        for tool in tools:
            log(f"labgate warm {tool} x{samples[tool]}")
            results["single"][f"labgate warm pool {tool}"] = await labgate_singles(
                lg, tool, samples[tool], warm=True, timeout=args.timeout
            )
    finally:
        lg.stop()  # pool instances stop with their pools below
        restart = Labgate(work / "warm", [])
        restart.port, restart.url = lg.port, lg.url
        restart.env["LABGATE_PORT"] = str(lg.port)
        with contextlib.suppress(Exception):
            await restart.start()  # no pools now: leftovers are stopped at start
            await restart.stop_all()
        restart.stop()

    if not args.skip_jupyterhub and not args.skip_jupyterlab:
        hub = new_hub(work, args, results)
        try:
            await hub.start()
            log(f"JupyterHub jupyterlab x{args.jupyter_samples}")
            results["single"]["JupyterHub jupyterlab"] = await hub_singles(
                hub, args.jupyter_samples, args.timeout
            )
            log(f"JupyterHub: {args.concurrent} jupyterlab launches at once")
            results["concurrent"]["JupyterHub jupyterlab"] = await hub_concurrent(
                hub, args.concurrent, args.timeout
            )
        finally:
            hub.stop()
    results["machine"]["load_after"] = os.getloadavg()[0]
    return results


#: Seconds between polls of each launch in a storm (both systems): the pollers must
#: not take the CPU the starting tools need.
STORM_POLL = 0.5


async def storms(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> dict[str, Any]:
    """One JupyterLab launch alone, then each storm, on labgate and then on JupyterHub."""
    results["storm"] = {}
    lg = Labgate(work / "storm", start_timeout=args.start_timeout)
    try:
        await lg.start()
        await lg.users(1)
        log("labgate: one JupyterLab launch alone")
        results["single"]["labgate cold jupyterlab"] = await labgate_singles(
            lg, "jupyterlab", args.jupyter_samples, warm=False, timeout=args.timeout
        )
        for count in args.storm:
            log(f"labgate: {count} JupyterLab launches at once")
            await asyncio.sleep(5)
            results["storm"][f"labgate {count}"] = await labgate_concurrent(
                lg, "jupyterlab", count, args.timeout, STORM_POLL
            )
    finally:
        with contextlib.suppress(Exception):
            await lg.stop_all()
        lg.stop()
    if not args.skip_jupyterhub:
        hub = new_hub(work, args, results)
        try:
            await hub.start()
            log("JupyterHub: one JupyterLab launch alone")
            results["single"]["JupyterHub jupyterlab"] = await hub_singles(
                hub, args.jupyter_samples, args.timeout
            )
            for count in args.storm:
                log(f"JupyterHub: {count} JupyterLab launches at once")
                await asyncio.sleep(5)
                results["storm"][f"JupyterHub {count}"] = await hub_concurrent(
                    hub, count, args.timeout, STORM_POLL
                )
        finally:
            hub.stop()
    results["machine"]["load_after"] = os.getloadavg()[0]
    return results


def ready(value: float | None) -> float:
    """A quantile from :func:`summary`: None (a failed launch) is never."""
    return math.inf if value is None else value


def seconds(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.1f} s"


def storm_targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Per storm: no labgate failure; p50 at most 0.6x JupyterHub's, p95 at most its."""
    out: list[tuple[str, str, str, bool]] = []
    for count in r["args"]["storm"] or []:
        lg, hub = r["storm"].get(f"labgate {count}", {}), r["storm"].get(f"JupyterHub {count}", {})
        out.append(
            (
                f"{count} JupyterLab at once: labgate failures",
                str(lg.get("failures", "?")),
                "0",
                lg.get("failures") == 0,
            )
        )
        if lg and hub:
            # Over every launch: a failed one is never ready (a storm where most of one
            # side's launches fail has no meaningful percentile of its successes alone).
            lg50, hub50 = ready(lg.get("p50_all")), ready(hub.get("p50_all"))
            lg95, hub95 = ready(lg.get("p95_all")), ready(hub.get("p95_all"))
            finite = math.isfinite(lg50) and math.isfinite(hub50)
            ratio = f" = {lg50 / hub50:.2f}x" if finite else ""
            out.append(
                (
                    f"{count} at once: p50 labgate / JupyterHub (every launch; failed: never)",
                    f"{seconds(lg50)} / {seconds(hub50)}{ratio}",
                    "<= 0.6x",
                    math.isfinite(lg50) and lg50 <= 0.6 * hub50,
                )
            )
            out.append(
                (
                    f"{count} at once: p95 labgate / JupyterHub (every launch; failed: never)",
                    f"{seconds(lg95)} / {seconds(hub95)}",
                    "labgate <= JupyterHub",
                    math.isfinite(lg95) and lg95 <= hub95,
                )
            )
    return out


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    single, many = r["single"], r["concurrent"]
    out: list[tuple[str, str, str, bool]] = storm_targets(r) if r.get("storm") else []
    warm = single.get("labgate warm pool demo", {})
    if warm.get("n"):
        ms = warm["p50"] * 1000
        out.append(
            ("warm-pool demo, claim to first 200, p50", f"{ms:.0f} ms", "< 100 ms", ms < 100)
        )
    cold, hub = single.get("labgate cold jupyterlab", {}), single.get("JupyterHub jupyterlab", {})
    if cold.get("n") and hub.get("n"):
        out.append(
            (
                "cold JupyterLab p50, labgate vs JupyterHub",
                f"{cold['p50']:.2f} s vs {hub['p50']:.2f} s",
                "labgate <= JupyterHub",
                cold["p50"] <= hub["p50"],
            )
        )
    demo = many.get("labgate demo", {})
    if demo.get("n") is not None:
        n = r["args"]["concurrent"]
        p95 = demo.get("p95", float("inf"))
        out.append(
            (
                f"{n} demo launches at once, p95 / failures",
                f"{p95:.2f} s / {demo['failures']}",
                "< 5 s / 0",
                p95 < 5 and demo["failures"] == 0,
            )
        )
    return out


def single_rows(title: str, single: dict[str, dict[str, Any]]) -> list[str]:
    """A Markdown table of one-at-a-time launches: n, p50, p95, min, max, failures."""
    rows = [
        f"| {title} | n | p50 s | p95 s | min s | max s | failures |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in single.items():
        if s.get("n"):
            rows.append(
                f"| {name} | {s['n']} | {s['p50']:.3f} | {s['p95']:.3f} | {s['min']:.3f} "
                f"| {s['max']:.3f} | {s['failures']} |"
            )
        else:
            rows.append(f"| {name} | 0 | | | | | {s['failures']} |")
    return rows


def table(r: dict[str, Any]) -> str:
    rows = single_rows("one launch at a time", r["single"])
    many = r.get("storm") or r["concurrent"]
    heading = (
        "JupyterLab storm" if r.get("storm") else f"{r['args']['concurrent']} launches at once"
    )
    rows += [
        "",
        f"| {heading} | ok | p50 s | p95 s | max s | failures |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in many.items():
        if s.get("n"):
            rows.append(
                f"| {name} | {s['n']} | {s['p50']:.2f} | {s['p95']:.2f} | {s['max']:.2f} "
                f"| {s['failures']} |"
            )
        else:
            rows.append(f"| {name} | 0 | | | | {s['failures']} |")
    stops = {name: s for name, s in many.items() if "stop_all_s" in s}
    if stops:
        rows += [
            "",
            "| labgate | `serve` CPU, launches | all stopped at once | `serve` CPU, stops |",
            "|---|---:|---:|---:|",
        ]
        for name, s in stops.items():
            rows.append(
                f"| {name} | {s['serve_cpu_s']:.2f} | {s['stop_all_s']:.2f} s "
                f"| {s['stop_all_serve_cpu_s']:.2f} |"
            )
    rows += ["", "| target | measured | wanted | met |", "|---|---:|---|---|"]
    for name, value, wanted, met in targets(r):
        rows.append(f"| {name} | {value} | {wanted} | {'yes' if met else 'NO'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=10, help="single demo launches (10)")
    parser.add_argument(
        "--jupyter-samples", type=int, default=5, help="single JupyterLab launches (5)"
    )
    parser.add_argument("--concurrent", type=int, default=50, help="launches at once (50)")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds the benchmark waits per launch (900)"
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=120,
        help="the start timeout of both labgate's JupyterLab and JupyterHub's spawner (120)",
    )
    parser.add_argument(
        "--storm",
        type=int,
        nargs="+",
        metavar="N",
        help="only JupyterLab: one launch alone, then N at once (labgate, JupyterHub)",
    )
    parser.add_argument("--skip-jupyterhub", action="store_true", help="labgate only")
    parser.add_argument("--skip-jupyterlab", action="store_true", help="demo only (no hub)")
    parser.add_argument("--quick", action="store_true", help="5 / 3 samples, 20 at once")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.jupyter_samples, args.concurrent = 5, 3, 20
    results = asyncio.run(run(args))
    results["targets"] = [
        {"name": n, "value": v, "wanted": w, "met": m} for n, v, w, m in targets(results)
    ]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "launch.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
