"""The chaos run: a split labgate in use while its processes are killed with SIGKILL.

Issue 19: PostgreSQL, 3 portals, 2 routers, 2 agents (process backend), and
simulated users that sign in, launch the demo tool, use it (HTTP and a
WebSocket echo through a router), keep it alive and stop it, for a fixed
time; meanwhile a random labgate process is killed with SIGKILL every few
seconds and started again with the same ports and arguments. At the end it
settles and asserts: no instance lost, none running twice, none stuck in
queued/pending/starting/stopping/unreachable, every second of every instance
in exactly one usage record, requests to the tools failed only while the
user's router was down; it prints the longest interruption a user saw.

One run, on loopback only, in a temporary directory (kept when an assertion
fails, for its logs), on a fresh PostgreSQL database it drops again:

==========  =====================================================================
process     role
==========  =====================================================================
p1, p2, p3  ``labgate portal`` replicas (one database, one secret key; p1 starts
            first and migrates); p3 has no router nor agent: it serves the run's
            own checks and takes its turn at leading
r1, r2      ``labgate router --portal`` p1 and p2
a1, a2      ``labgate agent`` of network sites ``s1`` and ``s2`` (process backend,
            ``reach = "direct"``), dialing p1 and p2
users       asyncio tasks in this process; user ``n`` goes through router
            ``r(n % 2 + 1)`` (and so its portal, and that portal's site)
==========  =====================================================================

Every kill window runs from the SIGKILL until the process is back: a portal
or router answering ``/healthz``, an agent connected again (its log says so).
A request that failed counts against its user's router when it overlapped one
of that router's windows; the others are listed by what else was down.

Prints a Markdown table and, as its last line, the JSON of every figure (also
``benchmarks/results/chaos-<time>.json``); exits 1 when an assertion fails.

    .venv/bin/python benchmarks/chaos.py --duration 300 --kill-every 10
    .venv/bin/python benchmarks/chaos.py --quick     # 45 s, a kill every 5 s (the test suite's)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from startup import drop_postgres, free_port, fresh_postgres  # benchmarks/startup.py

from labgate.db.models import Instance, InstanceState, UsageRecord

PY = sys.executable
RESULTS = Path(__file__).with_name("results")
SECRET_KEY = "benchmark-chaos-key-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY"
ADMIN_PASSWORD = "benchmark-chaos-admin-password"
USER_PASSWORD = "chaos-user-password-19"
#: Marks every process this run starts (and nothing else), for the final scan.
RUN_MARK = "LABGATE_CHAOS_RUN"
UNSETTLED = ("queued", "pending", "starting", "stopping", "unreachable")
ENDED = ("stopped", "failed", "lost")
#: A failure this long after a window closed still counts as inside it.
WINDOW_GRACE = 1.0


def log(message: str) -> None:
    print(f"  .. {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes
def scan_env() -> dict[int, dict[str, str]]:
    """Every live process's environment, by pid (the ones this run can read)."""
    found: dict[int, dict[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        if state == "Z":
            continue
        env = {}
        for item in raw.split(b"\0"):
            name, sep, value = item.partition(b"=")
            if sep and name in (RUN_MARK.encode(), b"LABGATE_INSTANCE_ID"):
                env[name.decode()] = value.decode(errors="replace")
        if env:
            found[int(entry.name)] = env
    return found


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def tool_trees() -> dict[str, int]:
    """Instance id -> how many process trees carry it (a sandbox and its tool are one)."""
    pids: dict[str, set[int]] = {}
    for pid, env in scan_env().items():
        if "LABGATE_INSTANCE_ID" in env:
            pids.setdefault(env["LABGATE_INSTANCE_ID"], set()).add(pid)
    return {iid: sum(1 for p in group if parent_of(p) not in group) for iid, group in pids.items()}


@dataclass
class Window:
    """A process down: from its SIGKILL until it was back."""

    process: str
    killed: float
    back: float | None = None

    def covers(self, start: float, end: float) -> bool:
        back = self.back if self.back is not None else float("inf")
        return start <= back + WINDOW_GRACE and end >= self.killed


class Proc:
    """One labgate process of the deployment, started again with the same arguments."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], work: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = work / f"{name}.log"
        self.port = int(env.get("LABGATE_PORT", "0"))
        self.process: subprocess.Popen[bytes] | None = None
        self.connects_before = 0

    @property
    def kind(self) -> str:
        return self.args[0]

    def start(self) -> None:
        self.connects_before = self.connects()
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [PY, "-m", "labgate", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Ctrl-C of the run reaches only the run, which stops everything in order.
                start_new_session=True,
            )

    def connects(self) -> int:
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("agent: connected to")

    def is_up(self) -> bool:
        """Back in service: a portal or router answers; an agent connected again."""
        if self.process is None or self.process.poll() is not None:
            return False
        if self.kind == "agent":
            return self.connects() > self.connects_before
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
        return False

    async def wait_up(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.is_up):
            if self.process is not None and self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not up after {timeout:g} s")
            await asyncio.sleep(0.05)
        return time.monotonic()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Deployment:
    """The split labgate of one run: three portals, two routers, two agents."""

    def __init__(self, work: Path, database_url: str, run_id: str) -> None:
        self.work = work
        self.run_id = run_id
        self.database_url = database_url
        self.portals: list[Proc] = []
        self.routers: list[Proc] = []
        self.agents: list[Proc] = []
        self.admin: dict[str, str] = {}

    @property
    def procs(self) -> list[Proc]:
        return [*self.portals, *self.routers, *self.agents]

    def env(self, name: str, **extra: str) -> dict[str, str]:
        data_dir = self.work / name
        data_dir.mkdir(mode=0o700, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
        # As an installed labgate: a restart reads the bytecode cache the first start wrote.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(
            {RUN_MARK: self.run_id},
            LABGATE_DATA_DIR=str(data_dir),
            LABGATE_HOST="127.0.0.1",
            LABGATE_SECRET_KEY=SECRET_KEY,
            LABGATE_POLL_INTERVAL="0.5",
            **extra,
        )
        return env

    def portal_env(self, name: str) -> dict[str, str]:
        return self.env(
            name,
            LABGATE_PORT=str(free_port()),
            LABGATE_DATABASE_URL=self.database_url,
            LABGATE_REPLICA_ID=name,
            LABGATE_ADMIN_PASSWORD=ADMIN_PASSWORD,
            LABGATE_LEADER_LEASE_SECONDS="3",
            LABGATE_SITE_HEARTBEAT_INTERVAL="1",
            LABGATE_STOP_GRACE_SECONDS="2",
            LABGATE_MAX_INSTANCES_PER_USER="50",
        )

    def portal_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.portals[index].port}"

    def router_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.routers[index].port}"

    async def start(self, users: int) -> list[str]:
        """Start everything, add the sites and ``users`` users; their names."""
        for name in ("p1", "p2", "p3"):
            self.portals.append(Proc(name, ["portal"], self.portal_env(name), self.work))
        # The first replica alone migrates the new database and makes the admin.
        self.portals[0].start()
        await self.portals[0].wait_up(120)
        for portal in self.portals[1:]:
            portal.start()
        await asyncio.gather(*(p.wait_up(120) for p in self.portals[1:]))
        self.admin = await asyncio.to_thread(self.admin_token)
        names = [f"user{n}" for n in range(users)]
        async with httpx.AsyncClient(
            base_url=self.portal_url(2), headers=self.admin, timeout=30
        ) as client:
            tokens = []
            for site in ("s1", "s2"):
                body = {"name": site, "backend": "process", "reach": "direct"}
                created = await client.post("/api/v1/sites", json=body)
                if created.status_code != 201:
                    raise RuntimeError(f"adding site {site}: {created.text}")
                tokens.append(str(created.json()["token"]))
            for name in names:
                made = await client.post(
                    "/api/v1/users", json={"name": name, "password": USER_PASSWORD}
                )
                if made.status_code != 201:
                    raise RuntimeError(f"adding {name}: {made.text}")
        for index in range(2):
            upstream = self.portal_url(index)
            router_env = self.env(f"r{index + 1}", LABGATE_PORT=str(free_port()))
            self.routers.append(
                Proc(f"r{index + 1}", ["router", "--portal", upstream], router_env, self.work)
            )
            agent_env = self.env(
                f"a{index + 1}",
                LABGATE_AGENT_PORTAL=upstream,
                LABGATE_AGENT_TOKEN=tokens[index],
                LABGATE_AGENT_RECONNECT_MAX="1",
            )
            self.agents.append(Proc(f"a{index + 1}", ["agent"], agent_env, self.work))
        for proc in [*self.routers, *self.agents]:
            proc.start()
        await asyncio.gather(*(p.wait_up(120) for p in [*self.routers, *self.agents]))
        return names

    def admin_token(self) -> dict[str, str]:
        with httpx.Client(base_url=self.portal_url(0), timeout=30) as client:
            login = client.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            login.raise_for_status()
            created = client.post(
                "/api/v1/tokens",
                json={"note": "chaos", "scopes": ["admin", "account", "instances:access"]},
                headers={"X-CSRF-Token": login.json()["csrf_token"]},
            )
            created.raise_for_status()
        return {"Authorization": f"token {created.json()['token']}"}

    async def stop_instances(self, timeout: float) -> int:
        """Stop every active instance through the API; how many were still active at the end."""
        deadline = time.monotonic() + timeout
        active: list[dict[str, Any]] = []
        async with httpx.AsyncClient(headers=self.admin, timeout=30) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    url = self.portal_url(2)
                    active = (await client.get(f"{url}/api/v1/instances?active=true")).json()
                    if not active:
                        return 0
                    for instance in active:
                        if instance["state"] != "stopping":
                            # Each through the portal its site's agent is connected to.
                            index = 1 if instance.get("site") == "s2" else 0
                            iid = instance["id"]
                            await client.delete(f"{self.portal_url(index)}/api/v1/instances/{iid}")
                await asyncio.sleep(0.5)
        return len(active)

    def shutdown(self, instance_ids: set[str]) -> int:
        """Stop every process of the run, then kill what is left of it; how many were left.

        Left: a labgate process of this run that SIGTERM did not end, or a tool of one
        of its instances still running once every instance was stopped.
        """
        for proc in [*self.agents, *self.routers, *self.portals]:
            with contextlib.suppress(Exception):
                proc.stop()
        leftovers = [
            pid
            for pid, env in scan_env().items()
            if env.get(RUN_MARK) == self.run_id
            or env.get("LABGATE_INSTANCE_ID", "") in instance_ids
        ]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(leftovers)


# --------------------------------------------------------------------------- users
@dataclass
class Outcome:
    """One request of a simulated user."""

    user: str
    router: str
    kind: str  # api, http, ws
    what: str
    start: float
    end: float
    ok: bool
    detail: str = ""
    instance: str = ""
    site: str = ""


@dataclass
class Run:
    """What happened during the run."""

    t0: float
    outcomes: list[Outcome] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    launched: dict[str, str] = field(default_factory=dict)  # instance id -> user
    cycles: int = 0
    #: Instances seen running as more than one process tree in two samples in a row.
    doubled: dict[str, int] = field(default_factory=dict)

    def note(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


class User:
    """A simulated user: sign in, launch demo, use it, keep it alive, stop it, again."""

    def __init__(self, name: str, router: int, deployment: Deployment, run: Run) -> None:
        self.name = name
        self.router = router
        self.router_name = f"r{router + 1}"
        self.site = f"s{router + 1}"
        self.base = deployment.router_url(router)
        self.run = run
        self.headers: dict[str, str] = {}
        self.client = httpx.AsyncClient(base_url=self.base, timeout=httpx.Timeout(5, read=10))

    async def api(
        self,
        what: str,
        method: str,
        path: str,
        instance: str = "",
        accept: tuple[int, ...] = (),
        **kw: Any,
    ) -> httpx.Response | None:
        """One API call through the router; recorded; None when it failed.

        ``accept``: error statuses that are an answer here (a stop of what has ended).
        """
        start = time.monotonic()
        detail, response = "", None
        headers = {**self.headers, **kw.pop("headers", {})}
        try:
            response = await self.client.request(method, path, headers=headers, **kw)
            if response.status_code >= 400 and response.status_code not in accept:
                detail = f"{response.status_code} {response.text[:160]}"
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}"[:200]
        ok = not detail
        self.run.note(
            Outcome(
                self.name,
                self.router_name,
                "api",
                what,
                start,
                time.monotonic(),
                ok,
                detail,
                instance,
                self.site,
            )
        )
        return response if ok else None

    async def retry(
        self, what: str, method: str, path: str, until: float, instance: str = "", **kw: Any
    ) -> httpx.Response | None:
        while time.monotonic() < until:
            response = await self.api(what, method, path, instance, **kw)
            if response is not None:
                return response
            await asyncio.sleep(0.3)
        return None

    async def sign_in(self, until: float) -> bool:
        login = await self.retry(
            "login",
            "POST",
            "/api/v1/auth/login",
            until,
            json={"username": self.name, "password": USER_PASSWORD},
        )
        if login is None:
            return False
        csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
        created = await self.retry(
            "token", "POST", "/api/v1/tokens", until, json={"note": "chaos"}, headers=csrf
        )
        if created is None:
            return False
        self.headers = {"Authorization": f"token {created.json()['token']}"}
        self.client.cookies.clear()
        return True

    async def live(self, until: float) -> list[str]:
        """This user's active instances (a launch whose answer was lost shows up here)."""
        listed = await self.retry("list", "GET", "/api/v1/instances?active=true", until)
        return [i["id"] for i in listed.json()] if listed is not None else []

    async def launch(self, until: float) -> str | None:
        """A running instance of demo (one launched before and not yet seen is taken)."""
        while time.monotonic() < until:
            known = [i for i in await self.live(until) if i not in self.run.launched]
            if known:
                iid = known[0]
            else:
                created = await self.api(
                    "launch", "POST", "/api/v1/instances", json={"tool": "demo"}
                )
                if created is None:
                    await asyncio.sleep(0.5)
                    continue
                iid = str(created.json()["id"])
            self.run.launched[iid] = self.name
            state = await self.wait_state(iid, {"running", *ENDED}, until + 60)
            if state == "running":
                return iid
            if state not in ENDED:  # never started: give it back
                await self.stop(iid)
        return None

    async def wait_state(self, iid: str, states: set[str], until: float) -> str:
        state = ""
        while time.monotonic() < until:
            got = await self.api("state", "GET", f"/api/v1/instances/{iid}", iid)
            if got is not None:
                state = str(got.json()["state"])
                if state in states:
                    return state
            await asyncio.sleep(0.3)
        return state

    async def stop(self, iid: str) -> None:
        until = time.monotonic() + 60
        stopped = await self.retry(
            "stop", "DELETE", f"/api/v1/instances/{iid}", until, iid, accept=(409,)
        )
        if stopped is not None:
            await self.wait_state(iid, set(ENDED), until)

    def note(self, kind: str, what: str, start: float, ok: bool, detail: str, iid: str) -> None:
        self.run.note(
            Outcome(
                self.name,
                self.router_name,
                kind,
                what,
                start,
                time.monotonic(),
                ok,
                detail,
                iid,
                self.site,
            )
        )

    async def use_http(self, iid: str, until: float) -> None:
        while time.monotonic() < until:
            start = time.monotonic()
            detail = ""
            try:
                got = await self.client.get(f"/i/{iid}/api/health", headers=self.headers)
                if got.status_code != 200:
                    detail = f"{got.status_code} {got.text[:120]}"
            except httpx.HTTPError as exc:
                detail = f"{type(exc).__name__}: {exc}"[:200]
            self.note("http", "GET /api/health", start, not detail, detail, iid)
            await asyncio.sleep(0.25)

    async def use_ws(self, iid: str, until: float) -> None:
        from websockets.asyncio.client import connect

        url = self.base.replace("http://", "ws://") + f"/i/{iid}/ws"
        n = 0
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                async with connect(
                    url, additional_headers=self.headers, open_timeout=5, close_timeout=1
                ) as ws:
                    self.note("ws", "open", start, True, "", iid)
                    while time.monotonic() < until:
                        start = time.monotonic()
                        n += 1
                        await ws.send(f"echo {n}")
                        answer = await asyncio.wait_for(ws.recv(), 5)
                        ok = answer == f"echo {n}"
                        self.note("ws", "echo", start, ok, "" if ok else f"got {answer!r}", iid)
                        await asyncio.sleep(0.25)
            except Exception as exc:  # every way a WebSocket breaks is a failure
                self.note("ws", "echo", start, False, f"{type(exc).__name__}: {exc}"[:200], iid)
                await asyncio.sleep(0.25)

    async def cycle(self, until: float, rng: random.Random) -> None:
        iid = await self.launch(until)
        if iid is None:
            return
        use_until = min(until, time.monotonic() + rng.uniform(4, 9))
        await self.retry(
            "keep-alive",
            "PUT",
            f"/api/v1/instances/{iid}/keep-alive",
            use_until,
            iid,
            json={"for": 3600},
        )
        await asyncio.gather(self.use_http(iid, use_until), self.use_ws(iid, use_until))
        await self.stop(iid)
        self.run.cycles += 1

    async def main(self, until: float, seed: int) -> None:
        rng = random.Random(seed)
        try:
            if await self.sign_in(until):
                while time.monotonic() < until:
                    await self.cycle(until, rng)
        finally:
            await self.client.aclose()


# --------------------------------------------------------------------------- chaos
async def killer(
    deployment: Deployment, run: Run, until: float, every: float, rng: random.Random
) -> None:
    """Every ``every`` seconds, SIGKILL a random labgate process that is up; start it again.

    Portals, routers and agents take turns; which one of a kind is drawn at random.
    """
    back: list[asyncio.Task[None]] = []
    busy: set[str] = set()

    async def restart(proc: Proc, window: Window) -> None:
        proc.start()
        try:
            window.back = await proc.wait_up(180)
        finally:
            busy.discard(proc.name)
        log(f"{proc.name} back after {window.back - window.killed:.1f} s")

    kinds = ["portal", "router", "agent"]
    rng.shuffle(kinds)
    for round_ in itertools.count():
        await asyncio.sleep(every)
        if time.monotonic() >= until:
            break
        # Kinds take turns (so a short run kills each), the process of a kind is drawn.
        kind = kinds[round_ % len(kinds)]
        choices = [p for p in deployment.procs if p.kind == kind and p.name not in busy]
        if not choices:
            continue
        proc = rng.choice(choices)
        busy.add(proc.name)
        window = Window(proc.name, time.monotonic())
        proc.kill()
        run.windows.append(window)
        log(f"killed {proc.name} (SIGKILL)")
        back.append(asyncio.create_task(restart(proc, window)))
    await asyncio.gather(*back)


async def watch_doubles(run: Run, until: float) -> None:
    """Sample the tools' process trees every second while the run lasts."""
    before: dict[str, int] = {}
    while time.monotonic() < until:
        now = {iid: n for iid, n in (await asyncio.to_thread(tool_trees)).items() if n > 1}
        for iid, n in now.items():
            if before.get(iid, 0) > 1:
                run.doubled[iid] = max(n, run.doubled.get(iid, 0))
        before = now
        await asyncio.sleep(1)


# --------------------------------------------------------------------------- checks
def in_window(outcome: Outcome, windows: list[Window], names: set[str]) -> bool:
    return any(w.process in names and w.covers(outcome.start, outcome.end) for w in windows)


def explain(outcome: Outcome, windows: list[Window]) -> str:
    """What was down while a request failed: its router, portal, agent, another, nothing."""
    index = outcome.router[1:]
    for what, names in (
        ("router", {outcome.router}),
        ("portal", {f"p{index}"}),
        ("agent", {f"a{outcome.site[1:]}"} if outcome.site else set()),
        ("other", {w.process for w in windows}),
    ):
        if names and in_window(outcome, windows, names):
            return what
    return "nothing"


def interruptions(outcomes: list[Outcome], kinds: set[str]) -> tuple[float, dict[str, Any]]:
    """The longest time one user's requests of ``kinds`` kept failing.

    From a failed request's start to the end of the next one that succeeded
    (on any of the user's instances: a user whose tool stayed away relaunches),
    or to the end of the last failure when none succeeded after it.
    """
    longest, worst = 0.0, {}
    streams: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.kind in kinds:
            streams.setdefault(o.user, []).append(o)
    for user, stream in streams.items():
        stream.sort(key=lambda o: o.start)
        first: Outcome | None = None
        last: Outcome | None = None
        ends: list[Outcome | None] = [*stream, None]
        for each in ends:
            if each is not None and not each.ok:
                first, last = first or each, each
                continue
            if first is None or last is None:
                continue
            until = each.end if each is not None else last.end
            if until - first.start > longest:
                longest = until - first.start
                worst = {
                    "user": user,
                    "router": first.router,
                    "from_s": first.start,
                    "to_s": until,
                    "recovered": each is not None,
                }
            first = last = None
    return longest, worst


def settle(engine: Any, timeout: float) -> dict[str, str]:
    """Wait until every instance is running or ended; the states of those that are not."""
    deadline = time.monotonic() + timeout
    while True:
        with Session(engine) as session:
            rows = session.execute(
                select(Instance.id, Instance.state).where(
                    Instance.state.in_([InstanceState(s) for s in UNSETTLED])
                )
            ).all()
        if not rows or time.monotonic() > deadline:
            return {iid: state.value for iid, state in rows}
        time.sleep(0.5)


def check_usage(session: Session, instance: Instance) -> list[str]:
    """How the usage records of ``instance`` fail to hold each of its seconds exactly once."""
    records = sorted(
        session.scalars(select(UsageRecord).where(UsageRecord.instance_id == instance.id)),
        key=lambda r: r.started_at,
    )
    if not records:
        return ["no usage record"]
    problems = []
    for before, after in itertools.pairwise(records):
        if before.stopped_at is None:
            problems.append("a record open before another")
        elif abs((after.started_at - before.stopped_at).total_seconds()) > 0.001:
            gap = (after.started_at - before.stopped_at).total_seconds()
            problems.append(f"{'gap' if gap > 0 else 'overlap'} of {abs(gap):.3f} s")
    last = records[-1]
    if instance.state.value in ENDED:
        if last.stopped_at is None:
            problems.append("record still open after the instance ended")
        elif instance.stopped_at is not None:
            off = abs((last.stopped_at - instance.stopped_at).total_seconds())
            if off > 1:
                problems.append(f"record ends {off:.1f} s away from the instance's end")
    elif last.stopped_at is not None:
        problems.append("running instance with no open record")
    # The record is made with the instance, a moment before its row's default time.
    if (records[0].started_at - instance.created_at).total_seconds() < -0.5:
        problems.append("record starts before the launch")
    return problems


def verify(engine: Any, run: Run, stuck: dict[str, str]) -> dict[str, Any]:
    """Every figure the run asserts on, from the database and the machine's processes."""
    trees = tool_trees()
    figures: dict[str, Any] = {"stuck": stuck}
    lost: dict[str, str] = {}
    duplicated: dict[str, int] = dict(run.doubled)
    leaked: dict[str, str] = {}
    usage_problems: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    accounted = 0.0
    with Session(engine) as session:
        instances = {i.id: i for i in session.scalars(select(Instance))}
        for iid in run.launched:
            if iid not in instances:
                lost[iid] = "launched, but not in the database"
        for iid, instance in instances.items():
            state, running = instance.state.value, trees.get(iid, 0)
            if state == "lost":
                lost[iid] = f"lost: {instance.reason}"
            elif state == "running" and running == 0:
                lost[iid] = "running, but no process carries it"
            if running > 1:
                duplicated[iid] = max(running, duplicated.get(iid, 0))
            if state in ENDED and running:
                leaked[iid] = f"{state}, yet {running} process tree(s) run it"
            if state == "failed":
                failed[iid] = instance.reason
            problems = check_usage(session, instance)
            if problems:
                usage_problems[iid] = problems
            for record in session.scalars(
                select(UsageRecord).where(UsageRecord.instance_id == iid)
            ):
                end = record.stopped_at or datetime.now(UTC)
                accounted += (end - record.started_at).total_seconds()
    figures.update(
        instances=len(instances),
        instances_by_state={
            s: sum(1 for i in instances.values() if i.state.value == s)
            for s in sorted({i.state.value for i in instances.values()})
        },
        lost=lost,
        duplicated=duplicated,
        leaked=leaked,
        failed=failed,
        usage_problems=usage_problems,
        usage_seconds=round(accounted, 1),
    )
    return figures


def traffic_figures(run: Run) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    unexplained: list[dict[str, Any]] = []
    for kind in ("api", "http", "ws"):
        outcomes = [o for o in run.outcomes if o.kind == kind]
        failures = [o for o in outcomes if not o.ok]
        reasons: dict[str, int] = {}
        for o in failures:
            why = explain(o, run.windows)
            reasons[why] = reasons.get(why, 0) + 1
            # Tool traffic may fail only while the user's router is down; the API also
            # while the router's portal is (or, for a launch, the site's agent).
            allowed = {"router"} if kind != "api" else {"router", "portal", "agent"}
            if why not in allowed:
                unexplained.append(
                    {**asdict(o), "start": o.start - run.t0, "end": o.end - run.t0, "down": why}
                )
        by_kind[kind] = {"requests": len(outcomes), "failed": len(failures), "while": reasons}
    tool_longest, tool_worst = interruptions(run.outcomes, {"http", "ws"})
    api_longest, _ = interruptions(run.outcomes, {"api"})
    if tool_worst:
        tool_worst = {
            **tool_worst,
            "from_s": tool_worst["from_s"] - run.t0,
            "to_s": tool_worst["to_s"] - run.t0,
        }
    return {
        "requests": by_kind,
        "unexplained_count": len(unexplained),
        "unexplained_failures": unexplained[:50],
        "longest_interruption_s": round(tool_longest, 2),
        "longest_interruption": tool_worst,
        "longest_api_interruption_s": round(api_longest, 2),
    }


# --------------------------------------------------------------------------- the run
async def chaos(args: argparse.Namespace, work: Path, url: str, run_id: str) -> dict[str, Any]:
    deployment = Deployment(work, url, run_id)
    rng = random.Random(args.seed)
    engine = create_engine(url)
    run: Run | None = None
    shut = False
    try:
        log("starting 3 portals, 2 routers, 2 agents")
        names = await deployment.start(args.users)
        run = Run(time.monotonic())
        until = run.t0 + args.duration
        log(f"{len(names)} users for {args.duration:g} s, a kill every {args.kill_every:g} s")
        users = [User(name, n % 2, deployment, run) for n, name in enumerate(names)]
        await asyncio.gather(
            killer(deployment, run, until, args.kill_every, rng),
            watch_doubles(run, until),
            *(user.main(until, args.seed + n) for n, user in enumerate(users)),
        )
        ended = time.monotonic()
        log("users done; settling")
        for proc in deployment.procs:  # everything is back, then it must settle
            await proc.wait_up(120)
        stuck = await asyncio.to_thread(settle, engine, args.settle)
        figures = await asyncio.to_thread(verify, engine, run, stuck)
        with (work / "outcomes.jsonl").open("w") as out:  # for a look when a check fails
            for outcome in run.outcomes:
                out.write(json.dumps({**asdict(outcome), "t": outcome.start - run.t0}) + "\n")
        figures.update(traffic_figures(run))
        figures.update(
            duration_s=args.duration,
            kill_every_s=args.kill_every,
            users=args.users,
            cycles=run.cycles,
            settle_s=round(time.monotonic() - ended, 1),
            kills=[
                {
                    "process": w.process,
                    "at_s": round(w.killed - run.t0, 2),
                    "down_s": round(w.back - w.killed, 2) if w.back else None,
                }
                for w in run.windows
            ],
        )
        log("stopping every instance")
        figures["not_stopped_at_end"] = await deployment.stop_instances(60)
        figures["leftover_processes"] = deployment.shutdown(known_ids(engine, run))
        shut = True
        return figures
    finally:
        if not shut:  # failed or interrupted: still nothing may be left running
            left = deployment.shutdown(known_ids(engine, run) if run else set())
            log(f"stopped everything ({left} process(es) had to be killed)")
        engine.dispose()


def known_ids(engine: Any, run: Run) -> set[str]:
    """Every instance id of the run: launched by a user, or in the database."""
    ids = set(run.launched)
    with contextlib.suppress(Exception), Session(engine) as session:
        ids.update(session.scalars(select(Instance.id)))
    return ids


def assertions(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(what, value, holds) for each thing the run asserts."""
    tool_failed = r["requests"]["http"]["failed"] + r["requests"]["ws"]["failed"]
    return [
        ("instances lost", str(len(r["lost"])), not r["lost"]),
        ("instances running twice", str(len(r["duplicated"])), not r["duplicated"]),
        ("ended instances still running", str(len(r["leaked"])), not r["leaked"]),
        (
            "stuck in queued/pending/starting/stopping/unreachable",
            str(len(r["stuck"])),
            not r["stuck"],
        ),
        (
            "instances whose usage records miss or double a second",
            str(len(r["usage_problems"])),
            not r["usage_problems"],
        ),
        (
            "requests failed while nothing they use was down / tool requests failed while "
            "their router was up",
            f"{len(r['unexplained_failures'])} of {tool_failed} tool "
            f"and {r['requests']['api']['failed']} API failures",
            not r["unexplained_failures"],
        ),
        (
            "instances left running at the end",
            str(r["not_stopped_at_end"]),
            not r["not_stopped_at_end"],
        ),
        ("processes left behind", str(r["leftover_processes"]), not r["leftover_processes"]),
        ("launch-use-stop cycles completed", str(r["cycles"]), r["cycles"] > 0),
    ]


def report(r: dict[str, Any]) -> bool:
    checks = assertions(r)
    r["assertions"] = {what: holds for what, _, holds in checks}
    r["ok"] = all(holds for _, _, holds in checks)
    kills: dict[str, int] = {}
    for k in r["kills"]:
        kills[k["process"][0]] = kills.get(k["process"][0], 0) + 1
    down = [k["down_s"] for k in r["kills"] if k["down_s"] is not None]
    print(
        f"\nchaos run: {r['duration_s']:g} s, {r['users']} users, {len(r['kills'])} kills "
        f"(portal {kills.get('p', 0)}, router {kills.get('r', 0)}, agent {kills.get('a', 0)}), "
        f"{r['instances']} instances, {r['cycles']} cycles\n"
    )
    print("| check | value | ok |")
    print("|---|---:|:--:|")
    for what, value, holds in checks:
        print(f"| {what} | {value} | {'yes' if holds else '**NO**'} |")
    print(
        "\n| requests | sent | failed | failed while down: "
        "router / portal / agent / other / nothing |"
    )
    print("|---|---:|---:|---|")
    for kind, row in r["requests"].items():
        w = row["while"]
        spread = " / ".join(
            str(w.get(k, 0)) for k in ("router", "portal", "agent", "other", "nothing")
        )
        print(f"| {kind} | {row['requests']} | {row['failed']} | {spread} |")
    print(
        f"\nlongest interruption of a tool a user saw: {r['longest_interruption_s']:.2f} s; "
        f"of the API: {r['longest_api_interruption_s']:.2f} s; "
        f"process back after a kill: max {max(down, default=0):.1f} s; "
        f"failed instances: {len(r['failed'])}"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(r, indent=2))
    print(f"written to {out}")
    print(json.dumps(r))
    return bool(r["ok"])


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--db-url",
        default=os.environ.get("LABGATE_TEST_DB_URL", ""),
        help="a PostgreSQL server (its postgres database; default LABGATE_TEST_DB_URL)",
    )
    parser.add_argument("--duration", type=float, default=300, help="seconds of use (300)")
    parser.add_argument("--kill-every", type=float, default=10, help="seconds between kills (10)")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--settle", type=float, default=90, help="seconds allowed to settle (90)")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--keep", action="store_true", help="keep the logs even when all holds")
    parser.add_argument("--quick", action="store_true", help="45 s, a kill every 5 s, 4 users")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.kill_every, args.users = 45, 5, 4
    if not args.db_url.startswith("postgresql"):
        parser.error("needs PostgreSQL: give --db-url or set LABGATE_TEST_DB_URL")
    run_id = uuid.uuid4().hex[:12]
    name = f"labgate_chaos_{run_id}"
    work = Path(tempfile.mkdtemp(prefix="labgate-chaos-"))
    os.chmod(work, 0o700)
    # SIGTERM ends the run as Ctrl-C does: through the finally blocks that stop everything.
    signal.signal(signal.SIGTERM, interrupted)
    ok = False
    try:
        url = fresh_postgres(args.db_url, name)
        figures = asyncio.run(chaos(args, work, url, run_id))
        ok = report(figures)
    finally:
        with contextlib.suppress(Exception):
            drop_postgres(args.db_url, name)
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
